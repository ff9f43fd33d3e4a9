"""``C = E[k k^T]`` of the keys of a linear layer, computed once and cached: the public face of the statistics.

ROME (and MEMIT after it) treats an MLP out-projection ``W`` as a linear associative memory that maps keys ``k``
(the module's *inputs*) to values ``W k``. To write a new association while disturbing the others as little as
possible, the update is shaped by the second moment of the keys the layer sees in ordinary text::

    C = E[k k^T] = (1 / N) * sum_{t=1..N} k_t k_t^T        (in_dim x in_dim)

where ``k_t`` runs over the module's input at every token ``t`` of a text corpus (Wikipedia in the papers).
:func:`second_moment` returns that matrix for one module, :func:`second_moments` for several (MEMIT's layers) from
one pass over the corpus.

What ``n_samples`` counts. As in ROME, ``n_samples`` is a number of **documents**: the first ``n_samples`` non-empty
texts of the corpus, in order. Every token of each of them (after truncation to ``max_length`` tokens, special
tokens the tokenizer adds included, padding excluded) contributes one key, so ``N`` - stored in the cache as
``n_tokens`` - is usually much larger than ``n_samples``. A corpus with fewer documents is used in full. An optional
token budget ``max_tokens`` ends the stream earlier: documents are taken in order until ``max_tokens`` tokens are
counted, the last one cut to fit, so that ``N = max_tokens`` exactly.

Computing. Cached matrices are read (:mod:`.cache`); missing ones are computed by the statistics job
(:class:`~.job.SecondMomentJob`) in a ``Trainer`` of its own on the model's device (:mod:`.run`): streamed,
resumable from its partial sums, sharded and all-reduced across processes. The same job is the command
``prune-edit stats`` (:mod:`.cli`), which fills the cache ahead of an editing run. The settings that travel from
here to the job are one :class:`StatsSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from prune_lightning.models import default_cache_dir, get_module, input_dim, model_device
from prune_lightning.stats.cache import (StatsSettings, accumulation_dtype, check_conditioning, check_max_length,
                                         default_model_id, expected_metadata, load_cached, load_stats_file,
                                         model_revision, read_metadata, stats_cache_path)
from prune_lightning.stats.corpus import file_sha256, local_corpus_path
from prune_lightning.stats.job import agree_on_missing
from prune_lightning.stats.provenance import tokenizer_sha256
from prune_lightning.stats.run import compute_second_moments

__all__ = ["StatsSettings", "second_moment", "second_moments"]


def second_moment(
    model: nn.Module,
    tokenizer,
    module_name: str,
    corpus: str,
    n_samples: int = 100000,
    dtype: str = "float32",
    batch_size: int = 16,
    max_length: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    stats_file: Optional[Union[str, Path]] = None,
    model_id: Optional[str] = None,
    recompute: bool = False,
    max_tokens: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every_n_steps: Optional[int] = None,
    forward_precision: Optional[str] = None,
) -> torch.Tensor:
    """The second moment ``C = E[k k^T]`` of the inputs ``k`` of ``module_name`` over a text corpus.

    Args:
        model: The causal LM whose module is measured (its weights as they are now).
        tokenizer: The model's tokenizer.
        module_name: The linear module whose inputs are the keys, e.g. ``"transformer.h.17.mlp.c_proj"``.
        corpus: Hub dataset ``"id[:config[:split]]"`` (column ``text``) or a local ``.txt`` / ``.jsonl`` / ``.json``
            file.
        n_samples: Number of documents (the first non-empty texts of the corpus); all their tokens count.
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``; the cache file stores the moment in this dtype.
        batch_size: Documents per forward pass.
        max_length: Documents are truncated to this many tokens (default: the model's context length, at most 4096).
        cache_dir: Where the cache lives (default: ``default_cache_dir() / "stats"``).
        stats_file: Precomputed statistics (safetensors with a ``"mom2"`` tensor or a single tensor, ``.npy``, or an
            ``.npz`` in the authors' layout); when given, nothing is computed or cached.
        model_id: Name of the model in the cache file name (default: basename of ``model.config._name_or_path``).
        recompute: Ignore an existing cache file and compute (and rewrite) it.
        max_tokens: Token budget: stop once this many tokens are counted (default: no budget).
        checkpoint_dir: Where the job keeps its partial sums while it runs (default: a folder under the cache that
            is removed once the cache file is written); an interrupted computation resumes from there.
        checkpoint_every_n_steps: Save the partial sums every this many batches (default: every 10 minutes).
        forward_precision: The forward pass's precision when computing (``"model"``, ``"bfloat16"``, ``"tf32"``;
            :mod:`.precision`); a cached file is compared on it only when it is given.

    Returns:
        The ``(in_dim, in_dim)`` matrix ``C`` as float32, on the CPU.
    """
    module = get_module(model, module_name)
    in_dim = input_dim(module)
    if stats_file is not None:
        moment = load_stats_file(stats_file, in_dim=in_dim, module_name=module_name)
        n_tokens = read_metadata(stats_file).get("n_tokens") if str(stats_file).endswith(".safetensors") else None
        check_conditioning(module_name, moment, int(n_tokens) if n_tokens else None, device=model_device(model))
        return moment
    return second_moments(
        model,
        tokenizer,
        [module_name],
        corpus,
        n_samples=n_samples,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        cache_dir=cache_dir,
        model_id=model_id,
        recompute=recompute,
        max_tokens=max_tokens,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=checkpoint_every_n_steps,
        forward_precision=forward_precision,
    )[module_name]


def second_moments(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    corpus: str,
    n_samples: int = 100000,
    dtype: str = "float32",
    batch_size: int = 16,
    max_length: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    model_id: Optional[str] = None,
    recompute: bool = False,
    max_tokens: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every_n_steps: Optional[int] = None,
    num_workers: int = 0,
    forward_precision: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """:func:`second_moment` of several modules; the ones not cached yet come from **one** pass over the corpus.

    Cached matrices are read; the missing ones are computed together by the statistics job (one forward pass per
    batch feeds all of them, stopped at the last measured module) and written to the cache, one file per module.
    Inside a ``torch.distributed`` program (e.g. called from a DDP rank's ``setup``) every process takes a share of
    the documents and the sums are all-reduced; all processes return the same matrices and process 0 writes them
    (see :mod:`.job` and :mod:`.run`).

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer.
        module_names: The linear modules whose inputs are measured.
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        n_samples: Number of documents.
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``.
        batch_size: Documents per forward pass.
        max_length: Truncation length in tokens (default: the model's context length, at most 4096).
        cache_dir: Where the cache lives (default: ``default_cache_dir() / "stats"``).
        model_id: Name of the model in the cache file names (default: basename of ``model.config._name_or_path``).
        recompute: Ignore existing cache files.
        max_tokens: Token budget (default: none).
        checkpoint_dir: Where the job keeps its partial sums (default: under the cache, removed after success).
        checkpoint_every_n_steps: Save the partial sums every this many batches (default: every 10 minutes).
        num_workers: DataLoader processes that read and tokenize ahead of the forward passes.
        forward_precision: The forward pass's precision when computing (:mod:`.precision`); compared with a cached
            file only when given.

    Returns:
        ``{module name: (in_dim, in_dim) float32 CPU matrix}``, in the order of ``module_names``.
    """
    names = list(module_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"module_names must name at least one module, each once; got {names}")
    in_dims = {name: input_dim(get_module(model, name)) for name in names}
    settings = StatsSettings(
        corpus=corpus, n_samples=n_samples, dtype=accumulation_dtype(dtype)[1], batch_size=batch_size,
        max_length=check_max_length(model, max_length), max_tokens=max_tokens,
        cache_dir=cache_dir, model_id=model_id or default_model_id(model), checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=checkpoint_every_n_steps, num_workers=num_workers,
        forward_precision=forward_precision,
    )
    local = local_corpus_path(corpus)
    corpus_sha256 = file_sha256(local) if local is not None else None
    tokenizer_hash = tokenizer_sha256(tokenizer)

    results: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name in names:
        path = stats_cache_path(settings.model_id, name, corpus, n_samples, settings.dtype, cache_dir=cache_dir,
                                max_tokens=max_tokens)
        expected = expected_metadata(settings.model_id, name, corpus, n_samples, settings.dtype, settings.max_length,
                                     max_tokens=max_tokens, corpus_sha256=corpus_sha256,
                                     model_revision=model_revision(model), tokenizer_sha256=tokenizer_hash,
                                     forward_precision=forward_precision)
        cached = load_cached(path, expected, in_dims[name]) if path.exists() and not recompute else None
        if cached is None:
            missing.append(name)
        else:
            results[name] = cached

    missing = agree_on_missing(names, missing)  # all processes compute together, or none does
    if missing:
        rank_zero_info(
            f"Computing the second moment of the inputs of {', '.join(missing)} over up to {n_samples} documents of "
            f"{corpus} (cache: {Path(cache_dir) if cache_dir is not None else default_cache_dir() / 'stats'})"
        )
        results.update(compute_second_moments(model, tokenizer, missing, settings))
    device = model_device(model)
    for name in names:
        path = stats_cache_path(settings.model_id, name, corpus, n_samples, settings.dtype, cache_dir=cache_dir,
                                max_tokens=max_tokens)
        n_tokens = read_metadata(path).get("n_tokens") if path.exists() else None
        check_conditioning(name, results[name], int(n_tokens) if n_tokens else None, device=device)
    return {name: results[name] for name in names}
