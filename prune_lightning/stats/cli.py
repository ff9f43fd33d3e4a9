"""``prune-edit stats``: fills the statistics cache ahead of an editing run, on any accelerator and number of devices;
imports the authors' precomputed files into it and exports ours in their layout.

    prune-edit stats --model gpt2-xl --layers 17 --corpus wikimedia/wikipedia:20231101.en --n_samples 100000
    prune-edit stats --model tiny:gpt2 --modules transformer.h.1.mlp.c_proj --corpus corpus.txt \\
        --checkpoint_dir runs/stats --resume --devices 2
    prune-edit stats compute ...                 # the same
    prune-edit stats import data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz \\
        --model gpt2-xl
    prune-edit stats export --model gpt2-xl --layers 17 --out data/stats

Computing runs a :class:`~.job.SecondMomentJob` on the model given by name, under a ``Trainer`` of the given
accelerator, devices, strategy and nodes; cached matrices whose provenance matches are not recomputed, and one whose
provenance differs is refused, naming the fields (``--recompute`` replaces it). ``import`` and ``export`` are
:func:`~.exchange.import_reference_stats` and :func:`~.exchange.export_reference_stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from prune_lightning.models import load_tokenizer, mlp_out_template, resolve_model_path
from prune_lightning.stats.cache import (check_max_length, check_request, expected_metadata, load_cached,
                                         model_id_from_name, model_revision, stats_cache_path)
from prune_lightning.stats.corpus import REFERENCE_CORPUS, file_sha256, local_corpus_path
from prune_lightning.stats.exchange import export_reference_stats, import_reference_stats
from prune_lightning.stats.job import SecondMomentJob
from prune_lightning.stats.precision import FORWARD_PRECISIONS
from prune_lightning.stats.provenance import tokenizer_sha256
from prune_lightning.stats.reference import REFERENCE_LAYOUTS
from prune_lightning.stats.run import StatsProgressBar, checkpoint_callback, checkpoint_lock

__all__ = ["main"]


def _split_list(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (both spellings work on the command line)."""
    if values is None:
        return None
    return [item for value in values for item in value.split(",") if item]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-edit stats [compute]",
        description="Computes the second moment C = E[k k^T] of the inputs of linear modules over a corpus and writes "
        "it to the statistics cache that the editors read.",
        epilog="Also: 'prune-edit stats import FILE.npz ... --model M' files the authors' precomputed statistics into "
        "the cache; 'prune-edit stats export ... --out DIR' writes cached ones in their layout (see --help of each).",
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
    add("--recompute", action="store_true", help="compute even where a cache file exists (one whose provenance "
        "differs is refused otherwise)")
    add("--forward_precision", default=None, choices=FORWARD_PRECISIONS, help="the forward pass's precision: model "
        "(its own dtype), bfloat16 (autocast) or tf32 (GPUs); the sums stay in --dtype (default: model)")
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``prune-edit stats [compute|import|export] ...``; prints and returns what was written (see each command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    return compute_main(argv[1:] if argv[:1] == ["compute"] else argv)


def _modules(args: argparse.Namespace, stub: SimpleNamespace, command: str) -> list[str]:
    """The measured modules of ``--modules`` or ``--layers`` (with ``--module_template``; one of the two)."""
    if (args.modules is None) == (args.layers is None):
        raise SystemExit(f"prune-edit stats{command}: give the measured modules with --modules or --layers (one of "
                         "them)")
    if args.modules is not None:
        return _split_list(args.modules)
    template = args.module_template or mlp_out_template(stub)
    return [template.format(int(layer)) for layer in _split_list(args.layers)]


def _config_stub(model: str) -> SimpleNamespace:
    """What the cache files are called needs only the model's config, not its weights."""
    from transformers import AutoConfig

    return SimpleNamespace(config=AutoConfig.from_pretrained(resolve_model_path(model)))


def compute_main(argv: Sequence[str]) -> dict[str, Path]:
    """``prune-edit stats [compute] ...``: fills the statistics cache; prints and returns ``{module: cache file}``."""
    args = _parser().parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("prune-edit stats: --resume needs --checkpoint_dir")
    stub = _config_stub(args.model)
    modules = _modules(args, stub, "")
    model_id = args.model_id or model_id_from_name(args.model)
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
    check = not args.recompute and any(file.exists() for file in paths.values())
    tokenizer_hash = tokenizer_sha256(load_tokenizer(args.tokenizer or args.model)) if check else None
    for name, file in paths.items():
        expected = expected_metadata(model_id, name, args.corpus, args.n_samples, args.dtype, max_length,
                                     max_tokens=args.max_tokens, corpus_sha256=sha,
                                     model_revision=model_revision(stub.config), tokenizer_sha256=tokenizer_hash,
                                     forward_precision=args.forward_precision)
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
            forward_precision=args.forward_precision,
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


def _import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-edit stats import",
        description="Files precomputed second moments in the authors' layout (ROME/MEMIT's layer_stats, EasyEdit's: "
        "<model>/<ds>_stats/<module>_<dtype>_mom2_<n>.npz) into the statistics cache, with their provenance, where the "
        "editors find them for the same model, module, corpus, n_samples and dtype.",
    )
    add = parser.add_argument
    add("files", nargs="+", help="the .npz files")
    add("--model", required=True, help="the model they belong to: hub id, local directory or tiny:<arch> spec")
    add("--modules", nargs="+", default=None, help="the module of each file (default: from the file names)")
    add("--corpus", default=None, help="our corpus spec to file them under (default: from the <ds>_stats folder; "
        f"wikipedia -> {REFERENCE_CORPUS})")
    add("--n_samples", type=int, default=None, help="number of documents (default: from the file name)")
    add("--dtype", default=None, choices=["float32", "float64"], help="default: the precision in the file name")
    add("--layout", default="rome", choices=REFERENCE_LAYOUTS, help="whose layer_stats wrote them (default "
        "%(default)s: kmeng01/rome, MEMIT, AlphaEdit)")
    add("--max_length", type=int, default=None, help="the truncation length they used (default: their rule for the "
        "model's config)")
    add("--model_id", default=None, help="model name in the cache (default: basename of --model)")
    add("--cache_dir", default=None, help="cache folder (default: the one the editors read)")
    add("--overwrite", action="store_true", help="replace cache files that hold other statistics")
    return parser


def import_main(argv: Sequence[str]) -> dict[str, Path]:
    """``prune-edit stats import FILE ... --model M``: prints and returns ``{module: cache file}``."""
    args = _import_parser().parse_args(argv)
    written = import_reference_stats(
        args.files, args.model, modules=_split_list(args.modules), corpus=args.corpus, n_samples=args.n_samples,
        dtype=args.dtype, layout=args.layout, max_length=args.max_length, model_id=args.model_id,
        cache_dir=args.cache_dir, overwrite=args.overwrite,
    )
    for (name, path), source in zip(written.items(), args.files):
        print(f"{name}: {path} (imported from {source})")
    return written


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-edit stats export",
        description="Writes cached second moments in the authors' layout (path, mom2.mom2 = C * count, mom2.count, "
        "sample_size), where their layer_stats loads them. Give the cache files, or the request that names them.",
    )
    add = parser.add_argument
    add("files", nargs="*", help="cache files (.safetensors); or give --model and --modules/--layers")
    add("--out", required=True, help="their stats_dir (e.g. data/stats)")
    add("--layout", default="rome", choices=REFERENCE_LAYOUTS, help="default %(default)s")
    add("--model_name", default=None, help="the model folder (default: the model id; ROME uses _name_or_path with "
        "'/' replaced by '_')")
    add("--ds_name", default=None, help="the dataset folder <ds_name>_stats (default: theirs for the corpus)")
    add("--batch_tokens", type=int, default=None, help="their batch_tokens, if below the context (the name then "
        "holds their literal _t{batch_tokens})")
    add("--overwrite", action="store_true", help="replace existing files")
    add("--model", default=None, help="with --modules/--layers: the request whose cache files to export")
    add("--modules", nargs="+", default=None)
    add("--layers", nargs="+", default=None)
    add("--module_template", default=None)
    add("--corpus", default=REFERENCE_CORPUS, help="default %(default)s")
    add("--n_samples", type=int, default=100000, help="default %(default)s")
    add("--dtype", default="float32", choices=["float32", "float64"], help="default %(default)s")
    add("--max_tokens", type=int, default=None)
    add("--model_id", default=None)
    add("--cache_dir", default=None)
    return parser


def export_main(argv: Sequence[str]) -> dict[Path, Path]:
    """``prune-edit stats export ... --out DIR``: prints and returns ``{cache file: written .npz}``."""
    args = _export_parser().parse_args(argv)
    files = [Path(f) for f in args.files]
    if args.model is not None:
        modules = _modules(args, _config_stub(args.model), " export")
        model_id = args.model_id or model_id_from_name(args.model)
        files += [stats_cache_path(model_id, name, args.corpus, args.n_samples, args.dtype, cache_dir=args.cache_dir,
                                   max_tokens=args.max_tokens) for name in modules]
    if not files:
        raise SystemExit("prune-edit stats export: give cache files, or --model with --modules/--layers")
    written = export_reference_stats(files, args.out, layout=args.layout, model_name=args.model_name,
                                     ds_name=args.ds_name, batch_tokens=args.batch_tokens, overwrite=args.overwrite)
    for source, path in written.items():
        print(f"{source} -> {path}")
    return written
