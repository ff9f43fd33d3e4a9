"""``prune-edit``: the LightningCLI of prune-lightning.

    prune-edit fit --config configs/tiny.yaml
    prune-edit fit --config configs/tiny.yaml --trainer.callbacks+=callbacks/prune.yaml
    prune-edit test --config configs/tiny.yaml --ckpt_path runs/.../last.ckpt
    prune-edit fit --print_config
    prune-edit demo [--config configs/demo.yaml] [--output runs/demo]
    prune-edit stats --model tiny:gpt2 --layers 1 --corpus corpus.txt   # fill the second-moment statistics cache
    prune-edit mend-train --config configs/tiny-mend-train.yaml         # train a MEND hypernetwork
    prune-edit ... --debug                                               # a refused input with its traceback

The model is a :class:`~prune_lightning.SequentialEditor` and the data an
:class:`~prune_lightning.data.EditDataModule`; every argument of both, of the editor and of the trainer is
configurable. A callback fragment under ``callbacks/`` is appended to whatever callbacks the experiment already lists
with ``--trainer.callbacks+=<fragment.yaml>``; a logger fragment under ``loggers/`` replaces the experiment's logger with
``--trainer.logger=<fragment.yaml>``. Configs are parsed in LightningCLI's OmegaConf mode (``omegaconf+``): a value may
interpolate another, and the interpolation is resolved after the command line's overrides. ``${run:<path>}`` names a
setting of the run wherever it stands (``save_dir: ${run:trainer.default_root_dir}`` in a logger, in a preset or a
fragment); OmegaConf's relative ``${..key}`` works too, but breaks when ``+=`` turns a node into a list.

Errors a user can act on (a bad setting, a malformed record, a file that is missing, a refused resume) are printed as
one line, ``prune-edit: error: ...``, with exit code 1; ``--debug`` (or ``PRUNE_EDIT_DEBUG=1``) shows the traceback
instead. A resume (``--ckpt_path``) keeps the settings of the command line: a checkpoint whose run differs in what
defines it (model, editor, edited matrices, restraints) is refused rather than followed silently
(:meth:`SequentialEditor.on_load_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

from prune_lightning.data import EditDataModule
from prune_lightning.module import TRAINER_DEFAULTS, SequentialEditor
from prune_lightning.resolvers import register_resolvers
from prune_lightning.stats.run import StatsLockedError

class PruneEditCLI(LightningCLI):
    """LightningCLI for sequential editing; see the module docstring for the commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        # OmegaConf interpolation, resolved after the command line's overrides ("omegaconf+"): a preset's logger
        # writes into ``${run:trainer.default_root_dir}``, so ``--trainer.default_root_dir`` moves the logs too.
        register_resolvers()
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        kwargs["parser_kwargs"] = parser_kwargs
        trainer_defaults = dict(TRAINER_DEFAULTS)
        trainer_defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(SequentialEditor, EditDataModule, *args, trainer_defaults=trainer_defaults, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs the subcommand; if a refused input stops it, the empty folders its loggers made go again (a failed
        run leaves no output of its own)."""
        fresh = [path for path in _logger_dirs(self.trainer) if not path.exists()]
        try:
            super()._run_subcommand(subcommand)
        except _USER_ERRORS:
            for path in sorted(fresh, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            raise

    def _parse_ckpt_path(self) -> None:
        """Lightning would load the checkpoint's hyperparameters over the command line's here. Not here: the command
        line stands, and the module refuses a checkpoint of a run that differs in what defines it."""


def _logger_dirs(trainer: Any) -> list[Path]:
    """The folders the trainer's loggers write into, outermost first (``save_dir``, ``save_dir/name``, version)."""
    dirs: list[Path] = []
    for logger in getattr(trainer, "loggers", []):
        save_dir = getattr(logger, "save_dir", None)
        if not save_dir:
            continue
        path = Path(save_dir)
        dirs.append(path)
        for part in (getattr(logger, "name", None), _version_dir(logger)):
            if part:
                path = path / str(part)
                dirs.append(path)
    return dirs


def _version_dir(logger: Any) -> Optional[str]:
    version = getattr(logger, "version", None)
    return version if isinstance(version, str) else f"version_{version}" if version is not None else None


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger"): nothing a user acts on here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the per-edit lines
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, from inside its own logging code.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


# What a user can act on: a refused setting or record, a missing file, an unsupported combination, a busy cache.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, NotImplementedError,
                StatsLockedError)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``prune-edit`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("PRUNE_EDIT_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        if args is None:
            sys.argv[1:] = argv
        else:
            args = argv
    try:
        _main(argv, args)
    except _USER_ERRORS as err:
        if debug:
            raise
        print(f"prune-edit: error: {short_message(err)}\n(--debug shows where it was raised)", file=sys.stderr)
        raise SystemExit(1) from None


def short_message(err: BaseException) -> str:
    """The message of an error, without what a parser wrapped around it: a setting refused inside
    LightningCLI's instantiation reaches us as "Does not validate against any of the Union subtypes ... Errors: -
    <ours>"."""
    text = str(err)
    if "Errors:" in text:
        reasons = [line.strip()[2:] for line in text.split("Errors:", 1)[1].splitlines()
                   if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
        if reasons:
            return "; ".join(reasons)
    return text.strip() or type(err).__name__


def _main(argv: list[str], args: Optional[list[str]]) -> None:
    _quiet_defaults()
    if argv[:1] == ["demo"]:
        # Not a Trainer method: the demo drives its fits itself (prune_lightning.demo.run).
        from prune_lightning.demo.run import main as demo_main

        demo_main(argv[1:])
        return
    if argv[:1] == ["stats"]:
        # Not a Trainer method either: the statistics job builds its own Trainer (prune_lightning.stats).
        from prune_lightning.stats.cli import main as stats_main

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
