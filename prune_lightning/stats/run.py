"""Running the statistics job inside another program: on a model in memory, in a ``Trainer`` of its own.

:func:`compute_second_moments` is what :func:`~.moments.second_moments` calls for missing statistics (e.g. from
``ROME.setup`` inside ``SequentialEditor``'s ``fit``). It runs a :class:`~.job.SecondMomentJob` on one device - the
model's -, with no logger, a progress bar, the partial sums checkpointed every 10 minutes under the cache folder
(``<cache>/.partial/...``, resumed if found, removed once the files are written), and Lightning's info lines silenced.
The model is used in place: it is not moved, copied or put in train mode, and Lightning's end-of-fit ``.cpu()`` does
not reach it. If ``torch.distributed`` is already initialized with several processes (the outer run is DDP), the
nested job does not start a distributed Trainer: every process runs a single-device job on its own share of the
documents (checkpointed per process), the sums are all-reduced over the existing process group, every process
returns the same matrices and process 0 writes the files. All processes must call it together.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from prune_lightning.models import default_cache_dir, model_device
from prune_lightning.stats.cache import StatsSettings, default_max_length, default_model_id, slug
from prune_lightning.stats.corpus import corpus_name, file_sha256, local_corpus_path
from prune_lightning.stats.job import EXPECTED_WARNINGS, SecondMomentJob, outer_world

__all__ = ["StatsLockedError", "StatsProgressBar", "checkpoint_callback", "checkpoint_lock", "compute_second_moments",
           "quiet_lightning"]

_DEFAULT_CHECKPOINT_INTERVAL = timedelta(minutes=10)


class StatsProgressBar(TQDMProgressBar):
    """Lightning's bar, titled "statistics", showing this process's token count (a Python int: no device sync)."""

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run starts mid-epoch, where Lightning skips on_train_epoch_start: set the total here as well.
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.set_description("statistics")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description("statistics")

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Union[int, str, float]]:
        return {"tokens": getattr(pl_module, "tokens_seen", 0)}


def checkpoint_callback(dirpath: Path, every_n_steps: Optional[int]) -> ModelCheckpoint:
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_steps`` batches, or every 10 minutes when None."""
    if every_n_steps is not None and every_n_steps < 1:
        raise ValueError(f"checkpoint_every_n_steps must be None or >= 1, got {every_n_steps}")
    return ModelCheckpoint(
        dirpath=str(dirpath),
        save_top_k=0,
        save_last=True,
        every_n_train_steps=every_n_steps,
        train_time_interval=None if every_n_steps else _DEFAULT_CHECKPOINT_INTERVAL,
        enable_version_counter=False,
    )


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silences Lightning's info lines ("GPU available", "`Trainer.fit` stopped") and its by-design warnings about
    this job (no optimizer, a stream with a length) in a nested run; other warnings stay."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.setLevel(level)


def compute_second_moments(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    settings: StatsSettings,
    progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """Runs a :class:`SecondMomentJob` on ``model`` where it is, in a single-device Trainer of its own; writes the
    cache files and returns ``{module: C}`` (float32, CPU). Safe to call from inside another Trainer's fit.

    The partial sums are checkpointed to ``settings.checkpoint_dir/last.ckpt`` (default: a folder under the cache
    named after the request, removed after success); a call that finds such a checkpoint resumes from it. Inside a
    multi-process ``torch.distributed`` program every process must call this together (see the module docstring).

    Args:
        model: The causal LM (not moved, copied or put in train mode).
        tokenizer: Its tokenizer.
        module_names: The measured modules.
        settings: The corpus, sample count, dtype, batch size, truncation, budget, cache and checkpoint settings.
        progress_bar: Show a progress bar (on process 0).
    """
    rank, world = outer_world()
    job = SecondMomentJob(
        model=model,
        tokenizer=tokenizer,
        modules=list(module_names),
        corpus=settings.corpus,
        n_samples=settings.n_samples,
        max_tokens=settings.max_tokens,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        model_id=settings.model_id or default_model_id(model),
        cache_dir=settings.cache_dir,
        num_workers=settings.num_workers,
        forward_precision=settings.forward_precision,
    )
    cache_dir, checkpoint_dir = settings.cache_dir, settings.checkpoint_dir
    checkpoint_every_n_steps = settings.checkpoint_every_n_steps
    keep_checkpoints = checkpoint_dir is not None
    if checkpoint_dir is None:
        checkpoint_dir = _partial_dir(job, model, cache_dir)
    checkpoint_dir = Path(checkpoint_dir)
    if world > 1:
        checkpoint_dir = checkpoint_dir / f"rank{rank}-of-{world}"
    device = model_device(model)
    accelerator = {"cuda": "gpu"}.get(device.type, device.type)
    show_bar = progress_bar and rank == 0
    last = checkpoint_dir / "last.ckpt"
    with checkpoint_lock(checkpoint_dir), quiet_lightning():
        ckpt_path = str(last) if last.exists() else None
        if ckpt_path is not None:
            rank_zero_info(f"Resuming the statistics of {', '.join(module_names)} from {last}")
        trainer = Trainer(
            accelerator=accelerator,
            devices=[device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else 1,
            strategy=SingleDeviceStrategy(device=device),
            logger=False,
            callbacks=[checkpoint_callback(checkpoint_dir, checkpoint_every_n_steps)]
            + ([StatsProgressBar()] if show_bar else []),
            enable_progress_bar=show_bar,
            enable_model_summary=False,
            default_root_dir=str(checkpoint_dir),
            max_epochs=1,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
        )
        trainer.fit(job, ckpt_path=ckpt_path)
        if not job.finished:
            raise RuntimeError(f"The statistics job stopped before the end of its stream; its checkpoint is {last}")
        if not keep_checkpoints:
            run_dir = checkpoint_dir if world == 1 else checkpoint_dir.parent
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # .partial, when nothing else is in progress
    return {name: job.moments[name] for name in module_names}


class StatsLockedError(RuntimeError):
    """Another statistics job holds the folder of partial sums that this one would resume from and write."""


@contextlib.contextmanager
def checkpoint_lock(directory: Union[str, Path]) -> Iterator[None]:
    """An exclusive lock on a folder of partial sums (``<folder>/.lock``, ``flock``): two jobs started together never
    resume from, or write, the same checkpoint. The second one is refused at once with :class:`StatsLockedError`,
    naming the holder. (``flock`` locks are per machine: jobs on two nodes need separate folders.)

    Args:
        directory: The folder (created if missing).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StatsLockedError(
            f"Another statistics job ({holder}) is computing into {directory} right now. Wait for it to finish (its "
            "statistics land in the cache, where this run will find them), or give this run another checkpoint_dir."
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _partial_dir(job: SecondMomentJob, model: nn.Module, cache_dir: Optional[Union[str, Path]]) -> Path:
    """``<cache>/.partial/<model>__<hash of the request>``: where a nested job keeps its partial sums."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    local = local_corpus_path(job.corpus)
    request = {
        "model_id": job.model_id,
        "modules": sorted(job.module_names),
        "corpus": corpus_name(job.corpus),
        "corpus_sha256": file_sha256(local) if local is not None else None,
        "n_samples": job.n_samples,
        "max_tokens": job.max_tokens,
        "dtype": job.dtype_name,
        "max_length": job.max_length or default_max_length(model),
        "forward_precision": job.forward_precision,
    }
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return root / ".partial" / f"{slug(job.model_id)}__{digest}"
