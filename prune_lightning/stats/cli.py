"""``prune-edit stats``: fills the statistics cache ahead of an editing run, on any accelerator and number of devices.

    prune-edit stats --model gpt2-xl --layers 17 --corpus wikimedia/wikipedia:20231101.en --n_samples 100000
    prune-edit stats --model tiny:gpt2 --modules transformer.h.1.mlp.c_proj --corpus corpus.txt \\
        --checkpoint_dir runs/stats --resume --devices 2

It runs a :class:`~.job.SecondMomentJob` on the model given by name, under a ``Trainer`` of the given accelerator,
devices, strategy and nodes; cached matrices whose provenance matches are not recomputed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from prune_lightning.models import mlp_out_template, resolve_model_path
from prune_lightning.stats.cache import (check_max_length, check_request, expected_metadata, load_cached,
                                         model_revision, stats_cache_path)
from prune_lightning.stats.corpus import REFERENCE_CORPUS, file_sha256, local_corpus_path
from prune_lightning.stats.job import SecondMomentJob
from prune_lightning.stats.run import StatsProgressBar, checkpoint_callback, checkpoint_lock

__all__ = ["main"]


def _split_list(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (both spellings work on the command line)."""
    if values is None:
        return None
    return [item for value in values for item in value.split(",") if item]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-edit stats",
        description="Computes the second moment C = E[k k^T] of the inputs of linear modules over a corpus and writes "
        "it to the statistics cache that the editors read.",
    )
    add = parser.add_argument
    add("--model", required=True, help="hub id, local directory or tiny:<arch> spec")
    add("--tokenizer", default=None, help="tokenizer id or path, if it differs from --model")
    add("--model_dtype", default="float32", help="parameter dtype of the model (default %(default)s)")
    add("--modules", nargs="+", default=None, help="measured module names (space- or comma-separated)")
    add("--layers", nargs="+", default=None, help="layer indices, with --module_template (default: the MLP "
        "out-projection of the model type)")
    add("--module_template", default=None, help="module name template for --layers, e.g. transformer.h.{}.mlp.c_proj")
    add("--corpus", default=REFERENCE_CORPUS, help="hub dataset id[:config[:split]] or a local "
        ".txt/.jsonl/.json file (default %(default)s)")
    add("--n_samples", type=int, default=100000, help="number of documents (default %(default)s)")
    add("--max_tokens", type=int, default=None, help="token budget (default: none)")
    add("--max_length", type=int, default=None, help="truncation length in tokens (default: the model's context, "
        "at most 4096)")
    add("--dtype", default="float32", choices=["float32", "float64"], help="accumulation dtype (default %(default)s)")
    add("--batch_size", type=int, default=16, help="documents per forward pass and device (default %(default)s)")
    add("--num_workers", type=int, default=0, help="DataLoader processes that tokenize ahead (default %(default)s)")
    add("--sort_window", type=int, default=64, help="order documents by length within windows of this many "
        "batches, to cut padding; 1: corpus order (default %(default)s)")
    add("--cache_dir", default=None, help="cache folder (default: the one the editors read)")
    add("--model_id", default=None, help="model name in the cache (default: basename of the model path)")
    add("--checkpoint_dir", default=None, help="keep the partial sums here (last.ckpt), to resume a killed run")
    add("--checkpoint_every", type=int, default=None, help="checkpoint every N batches (default: every 10 minutes)")
    add("--resume", action="store_true", help="resume from <checkpoint_dir>/last.ckpt if it exists")
    add("--recompute", action="store_true", help="compute even where a matching cache file exists")
    add("--accelerator", default="auto", help="cpu, gpu, ... (default %(default)s)")
    add("--devices", default="1", help="number of devices, or a list (default %(default)s)")
    add("--strategy", default="auto", help="Lightning strategy for several devices (default: ddp)")
    add("--num_nodes", type=int, default=1, help="number of nodes (default %(default)s)")
    return parser


def _devices(value: str) -> Union[int, str, list[int]]:
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """``prune-edit stats ...``: fills the statistics cache; prints and returns ``{module: cache file}``."""
    args = _parser().parse_args(argv)
    if (args.modules is None) == (args.layers is None):
        raise SystemExit("prune-edit stats: give the measured modules with --modules or --layers (one of them)")
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("prune-edit stats: --resume needs --checkpoint_dir")

    # What the cache files are called needs only the model's config, not its weights.
    from transformers import AutoConfig

    path = resolve_model_path(args.model)
    stub = SimpleNamespace(config=AutoConfig.from_pretrained(path))
    if args.modules is not None:
        modules = _split_list(args.modules)
    else:
        template = args.module_template or mlp_out_template(stub)
        modules = [template.format(int(layer)) for layer in _split_list(args.layers)]
    model_id = args.model_id or Path(str(path).rstrip("/")).name
    max_length = check_max_length(stub, args.max_length)
    check_request(args.n_samples, args.max_tokens)
    local = local_corpus_path(args.corpus)
    sha = file_sha256(local) if local is not None else None
    paths = {
        name: stats_cache_path(model_id, name, args.corpus, args.n_samples, args.dtype, cache_dir=args.cache_dir,
                               max_tokens=args.max_tokens)
        for name in modules
    }
    missing = []
    for name, file in paths.items():
        expected = expected_metadata(model_id, name, args.corpus, args.n_samples, args.dtype, max_length,
                                     max_tokens=args.max_tokens, corpus_sha256=sha,
                                     model_revision=model_revision(stub.config))
        if args.recompute or not file.exists() or load_cached(file, expected, None) is None:
            missing.append(name)

    if missing:
        job = SecondMomentJob(
            model=args.model,
            tokenizer=args.tokenizer,
            modules=missing,
            corpus=args.corpus,
            n_samples=args.n_samples,
            max_tokens=args.max_tokens,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_length=max_length,
            model_dtype=args.model_dtype,
            model_id=model_id,
            cache_dir=args.cache_dir,
            num_workers=args.num_workers,
            sort_window=args.sort_window,
        )
        callbacks: list = [StatsProgressBar()]
        if args.checkpoint_dir is not None:
            callbacks.append(checkpoint_callback(Path(args.checkpoint_dir), args.checkpoint_every))
        trainer = Trainer(
            accelerator=args.accelerator,
            devices=_devices(args.devices),
            strategy=args.strategy,
            num_nodes=args.num_nodes,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=args.checkpoint_dir is not None,
            enable_model_summary=False,
            default_root_dir=args.checkpoint_dir,
            max_epochs=1,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
        )
        ckpt_path = None
        if args.resume:
            last = Path(args.checkpoint_dir) / "last.ckpt"
            if last.exists():
                ckpt_path = str(last)
                rank_zero_info(f"Resuming from {last}")
            else:
                rank_zero_info(f"No checkpoint at {last}; starting from the beginning")
        # One process of the run holds the lock: the others (DDP ranks launched again with this command) share its folder.
        first = rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
        lock = checkpoint_lock(args.checkpoint_dir) if args.checkpoint_dir is not None and first \
            else contextlib.nullcontext()
        try:
            with lock:
                trainer.fit(job, ckpt_path=ckpt_path)
            is_zero = trainer.is_global_zero
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        if not is_zero:
            return paths
        # Under ddp_spawn the job ran in child processes only: then the files tell.
        ran_here = bool(job._grams)
        if (ran_here and not job.finished) or not all(paths[name].exists() for name in missing):
            raise SystemExit("prune-edit stats: the run ended before the end of its corpus; nothing was written. "
                             "Resume it with --checkpoint_dir DIR --resume.")
    for name, file in paths.items():
        print(f"{name}: {file}{'' if name in missing else ' (cached)'}")
    return paths
