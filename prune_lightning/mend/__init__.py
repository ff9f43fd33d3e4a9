"""MEND (Mitchell et al., ICLR 2022): a hypernetwork that turns an edit's fine-tuning gradient into a weight update.

- :mod:`.hypernet` - the hypernetwork (:class:`MENDHypernetwork`) and its file format;
- :mod:`.gradients` - the edit loss, the gradient factors ``(u, delta)`` and edited forward passes;
- :mod:`.data` - :class:`MENDDataModule`, the training and validation edits;
- :mod:`.trainer` - :class:`MENDTrainer`, the Lightning fit that trains the hypernetwork;
- :mod:`.cli` - ``prune-edit mend-train --config ...``.

The editor that uses a trained hypernetwork is :class:`prune_lightning.editors.MEND`.

    prune-edit mend-train --config configs/tiny-mend-train.yaml      # writes <run dir>/hypernetwork.safetensors
    MEND(hypernetwork="runs/tiny-mend/logs/version_0/hypernetwork.safetensors")
"""

from prune_lightning.mend.hypernet import (HYPERNETWORK_DEFAULTS, MENDHypernetwork, check_compatible,
                                           load_hypernetwork, save_hypernetwork)

__all__ = [
    "HYPERNETWORK_DEFAULTS",
    "MENDDataModule",
    "MENDHypernetwork",
    "MENDSample",
    "MENDTrainer",
    "check_compatible",
    "load_hypernetwork",
    "save_hypernetwork",
]


def __getattr__(name: str):
    # The Lightning pieces load lazily: the editor imports this package and needs none of them.
    if name in ("MENDDataModule", "MENDSample"):
        from prune_lightning.mend import data

        return getattr(data, name)
    if name == "MENDTrainer":
        from prune_lightning.mend.trainer import MENDTrainer

        return MENDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
