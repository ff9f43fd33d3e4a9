"""``prune-edit``: the LightningCLI of prune-lightning.

    prune-edit fit --config configs/tiny.yaml
    prune-edit fit --config configs/tiny.yaml --trainer.callbacks+=callbacks/prune.yaml
    prune-edit test --config configs/tiny.yaml --ckpt_path runs/.../last.ckpt
    prune-edit fit --print_config
    prune-edit demo [--config configs/demo.yaml] [--output runs/demo]
    prune-edit stats --model tiny:gpt2 --layers 1 --corpus corpus.txt   # fill the second-moment statistics cache
    prune-edit mend-train --config configs/tiny-mend-train.yaml         # train a MEND hypernetwork

The model is a :class:`~prune_lightning.SequentialEditor` and the data an
:class:`~prune_lightning.data.EditDataModule`; every argument of both, of the editor and of the trainer is
configurable. A callback fragment under ``callbacks/`` is appended to whatever callbacks the experiment already lists
with ``--trainer.callbacks+=<fragment.yaml>``.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

from prune_lightning.data import EditDataModule
from prune_lightning.module import SequentialEditor

# What makes a Trainer an editing loop: one pass over the request stream, no sanity validation, every step logged.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}


class PruneEditCLI(LightningCLI):
    """LightningCLI for sequential editing; see the module docstring for the commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        trainer_defaults = dict(TRAINER_DEFAULTS)
        trainer_defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(SequentialEditor, EditDataModule, *args, trainer_defaults=trainer_defaults, **kwargs)


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger"): nothing a user of this tool acts on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the per-edit lines
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, from inside its own logging code.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``prune-edit`` console script."""
    import sys

    _quiet_defaults()
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["demo"]:
        # Not a Trainer method: the demo drives three fits itself (prune_lightning.demo.run).
        from prune_lightning.demo.run import main as demo_main

        demo_main(argv[1:])
        return
    if argv[:1] == ["stats"]:
        # Not a Trainer method either: the statistics job builds its own Trainer (prune_lightning.editors.stats_job).
        from prune_lightning.editors.stats_job import main as stats_main

        stats_main(argv[1:])
        return
    if argv[:1] == ["mend-train"]:
        # A LightningCLI of its own: it fits MEND's hypernetwork, not an editing run (prune_lightning.mend.cli).
        from prune_lightning.mend.cli import main as mend_main

        mend_main(argv[1:])
        return
    try:
        PruneEditCLI(args=args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
