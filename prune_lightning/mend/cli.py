"""``prune-edit mend-train``: trains a MEND hypernetwork; a LightningCLI of :class:`MENDTrainer` and its data.

    prune-edit mend-train --config configs/tiny-mend-train.yaml                 # offline, a tiny GPT-2
    prune-edit mend-train --config configs/gpt2-xl/mend-train.yaml              # the published settings
    prune-edit mend-train --config configs/gpt2-xl/mend-train.yaml --ckpt_path runs/.../last.ckpt   # resume
    prune-edit mend-train --print_config

Every argument of the module (``--model.*``), the data (``--data.*``) and the trainer (``--trainer.*``) is
configurable. The trained hypernetwork is written to ``--model.hypernetwork_file`` (default
``<log dir>/hypernetwork.safetensors``) whenever the monitored validation score improves; ``MEND(hypernetwork=PATH)``
loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.cli import LightningCLI

from prune_lightning.mend.data import MENDDataModule
from prune_lightning.mend.trainer import MENDTrainer
from prune_lightning.resolvers import register_resolvers

__all__ = ["MENDTrainCLI", "TRAINING_DEFAULTS", "main"]

# The references' outer loop: gradients of 10 edits accumulated per Adam step, clipped to a total norm of 100;
# validation needs gradients (each validation edit is a backward pass).
TRAINING_DEFAULTS: dict[str, Any] = {
    "accumulate_grad_batches": 10,
    "gradient_clip_val": 100.0,
    "num_sanity_val_steps": 0,
    "inference_mode": False,
    "log_every_n_steps": 10,
    "enable_model_summary": False,
}


class MENDTrainCLI(LightningCLI):
    """LightningCLI that fits :class:`MENDTrainer` once (no subcommand), optionally from ``--ckpt_path``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        register_resolvers()  # configs are read as prune-edit reads them: OmegaConf, with ${run:<setting>}
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        kwargs["parser_kwargs"] = parser_kwargs
        defaults = dict(TRAINING_DEFAULTS)
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(MENDTrainer, MENDDataModule, *args, trainer_defaults=defaults, run=False, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume from this MENDTrainer checkpoint (e.g. <run dir>/checkpoints/last.ckpt)")


def main(argv: Optional[Sequence[str]] = None) -> MENDTrainCLI:
    """``prune-edit mend-train [--config FILE] [--ckpt_path CKPT] [--model.* ...] [--data.* ...] [--trainer.* ...]``."""
    import sys

    args = list(sys.argv[2:] if argv is None else argv)  # sys.argv: prune-edit mend-train ...
    saved, sys.argv = sys.argv, [f"{Path(sys.argv[0]).name} mend-train"]  # the program name in --help
    try:
        cli = MENDTrainCLI(args=args)
    finally:
        sys.argv = saved
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    if cli.model.exported is not None:
        cli.model.print(f"MEND hypernetwork written to {cli.model.exported}")
    return cli
