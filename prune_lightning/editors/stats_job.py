r"""The statistics job: ``C = E[k k^T]`` of the inputs of one or several linear modules, as a Lightning run.

:class:`SecondMomentJob` is a ``LightningModule`` whose ``training_step`` accumulates one batch of documents::

    S_m += K_m^T K_m          for every measured module m     (K_m: its inputs at the batch's non-padding tokens)
    N   += number of non-padding tokens

and whose end writes ``C_m = S_m / N`` to the cache that the editors read (:func:`.stats.stats_cache_path`, one
safetensors file per module, with the metadata of :func:`.stats.expected_metadata` plus ``n_tokens`` and
``n_documents``). One forward pass feeds every measured module and stops at the last of them (nothing above it is
computed). There is no optimizer: ``configure_optimizers`` returns ``None`` and each step calls the mock optimizer's
``step()``, so ``global_step`` counts batches (``max_steps``, ``every_n_train_steps`` work as usual).

Only the upper triangle of each ``S_m`` is computed, by row blocks (``S[a:b, a:] += K[:, a:b]^T K[:, a:]``; about 8
blocks, none narrower than 256), which saves up to 44% of the multiply-adds; the lower triangle is mirrored when the
moment is written.

The stream (:class:`CorpusStream`). The first ``n_samples`` non-empty documents of a hub dataset (streamed) or a
local ``.txt`` / ``.jsonl`` / ``.json`` file, in order, tokenized on the fly and cut to ``max_length`` tokens; an
optional ``max_tokens`` budget ends it earlier (counted in stream order; the last document is cut so that exactly
``max_tokens`` count). The stream is read in windows of ``sort_window`` steps; inside a window the documents are
ordered by length (as ROME's statistics code does), so a batch holds documents of similar length and little padding.
A window is cut into groups of ``batch_size * world_size`` documents, one group per step; process ``r`` of
``world_size`` takes the documents at positions ``r, r + world_size, ...`` of each group, so every process runs the
same number of steps (the last group may leave a process an empty batch) and the set of documents - hence ``C`` - does
not depend on the number of processes, the batch size or the window (up to float rounding). Each process reads the
whole stream of *texts* (cheap) but tokenizes and runs only its share (with a token budget it tokenizes every
document, to know where the budget ends).

Resuming. The job's state - the partial sums, ``N`` and the stream cursor after the last *processed* batch (start of
the current window in documents and in budget tokens, groups done in that window, steps taken, whether the stream is
exhausted) - goes into the Lightning checkpoint (``on_save_checkpoint``; the language model itself is not a
registered submodule, so its weights are not copied into every checkpoint). ``Trainer.fit(job, ckpt_path=...)``
restores it before the train loader is built, and the stream starts at the cursor: the window is read again, the
groups already summed are skipped (not run), the earlier documents are read past. The loader is stateful in
Lightning's sense (``state_dict`` / ``load_state_dict``): its saved state is that cursor, and on restore it checks
that the stream starts where the checkpoint says. A run resumed at a window boundary may use another batch size or
number of processes; in the middle of a window it must use the same ones (refused otherwise). A run that stops
before the stream is exhausted (``max_steps``, a kill) writes no cache file: it warns and waits to be resumed.

Distributed. Under a multi-process strategy (``ddp``, ``ddp_spawn``), each process accumulates its share; at the end
the sums and counts are all-reduced (``torch.distributed.all_reduce``) and process 0 writes the files. A checkpoint
holds the sums all-reduced at that step (process 0 restores them, the others start from zero), so it resumes under
any number of processes. Lightning's DDP wrapper needs one parameter that requires a gradient: the job has a
one-element dummy (``_ddp_anchor``); there is no backward pass, so no gradient is ever reduced.

Inside another program. :func:`compute_second_moments` (what :func:`.stats.second_moments` calls for missing
statistics, e.g. from ``ROME.setup`` inside ``SequentialEditor``'s ``fit``) runs the job in a ``Trainer`` of its own:
one device - the model's -, no logger, a progress bar, the partial sums checkpointed every 10 minutes under the cache
folder (``<cache>/.partial/...``, resumed if found, removed once the files are written), Lightning's info lines
silenced. The model is used in place: it is not moved, copied or put in train mode, and Lightning's end-of-fit
``.cpu()`` does not reach it. If ``torch.distributed`` is already initialized with several processes (the outer
run is DDP), the nested job does not start a distributed Trainer: every process runs a single-device job on its own
share of the documents (checkpointed per process), the sums are all-reduced over the existing process group, every
process returns the same matrices and process 0 writes the files. All processes must call it together; they first
agree on which modules are missing (:func:`agree_on_missing`).

The command line, ``prune-edit stats`` (:func:`main`), runs the job on a model given by name, on any accelerator
and number of devices::

    prune-edit stats --model gpt2-xl --layers 17 --corpus wikimedia/wikipedia:20231101.en --n_samples 100000
    prune-edit stats --model tiny:gpt2 --modules transformer.h.1.mlp.c_proj --corpus corpus.txt \
        --checkpoint_dir runs/stats --resume --devices 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from typing_extensions import override

from prune_lightning.editors.stats import (
    REFERENCE_CORPUS,
    STATS_FORMAT,
    _check_request,
    _default_max_length,
    _default_model_id,
    _load_cache,
    _local_corpus_path,
    _save_atomic,
    _sha256,
    _slug,
    accumulation_dtype,
    corpus_name,
    expected_metadata,
    iter_corpus_documents,
    stats_cache_path,
)
from prune_lightning.models import (
    default_cache_dir,
    get_module,
    input_dim,
    load_causal_lm,
    load_tokenizer,
    mlp_out_template,
    model_device,
    resolve_model_path,
)
from prune_lightning.tokens import pad_id, pad_right

__all__ = ["SecondMomentJob", "CorpusStream", "compute_second_moments", "agree_on_missing", "main"]

# By design: no optimizer (the job only sums), a stream whose length is an upper bound where it cannot be known, and
# no DataLoader workers by default (tokenizing is cheap next to the forward passes).
_EXPECTED_WARNINGS = (
    r".*configure_optimizers` returned `None`.*",
    r".*Your `IterableDataset` has `__len__` defined.*",
    r".*does not have many workers which may be a bottleneck.*",
    # the checkpoint of a step holds the sums *with* that step's batch, which is what resuming needs
    r".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*",
)
for _message in _EXPECTED_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)

_CKPT_KEY = "second_moment_job"
_START = {"steps": 0, "documents": 0, "tokens": 0, "skip": 0, "finished": False}
# Row blocks of the upper-triangle accumulation: about _GRAM_BLOCKS of them (multiply-adds: (n + 1) / 2n of the full
# product), none narrower than _GRAM_MIN_BLOCK (narrow products run slowly).
_GRAM_BLOCKS = 8
_GRAM_MIN_BLOCK = 256
_DEFAULT_CHECKPOINT_INTERVAL = timedelta(minutes=10)


class _StopForward(Exception):
    """Raised by a hook once the last measured module has its keys: the layers above are not needed."""


# --------------------------------------------------------------------------------------------------------------------
# the stream of documents
# --------------------------------------------------------------------------------------------------------------------


class CorpusStream(IterableDataset):
    """Padded batches of one process's share of the first documents of a corpus, tokenized on the fly.

    Each item is one step: ``input_ids`` / ``attention_mask`` (right-padded), ``token_index`` (flat indices of the
    non-padding positions; empty when there is no padding), ``n_tokens``, ``n_documents`` (this process's) and
    ``cursor`` (where the whole stream stands after this step; see the module docstring). With DataLoader workers,
    worker ``w`` of ``n`` serves the steps ``w, w + n, ...``, which the loader interleaves back into order.

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        tokenizer: The model's tokenizer.
        n_samples: Number of documents (the first non-empty ones).
        batch_size: Documents per process and step.
        max_length: Truncation length in tokens.
        max_tokens: Token budget over all processes (None: none).
        rank: This process's index.
        world_size: Number of processes sharing the stream.
        start: The cursor to start from (default: the beginning).
        sort_window: Documents are ordered by length within windows of this many steps, to cut padding (1: stream
            order).
    """

    def __init__(
        self,
        corpus: str,
        tokenizer,
        n_samples: int,
        batch_size: int,
        max_length: int,
        max_tokens: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
        start: Optional[dict[str, Any]] = None,
        sort_window: int = 64,
    ) -> None:
        super().__init__()
        if int(sort_window) < 1:
            raise ValueError(f"sort_window must be >= 1, got {sort_window}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.corpus = str(corpus)
        self.tokenizer = tokenizer
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start = dict(_START, **(start or {}))
        self.sort_window = int(sort_window)
        self._pad_id = pad_id(tokenizer)
        self._available: Optional[int] = None

    def __len__(self) -> int:
        """Steps of the whole run, those before ``start`` included: exact for a local corpus without a token budget,
        an upper bound otherwise (a hub corpus is counted as ``n_samples`` documents)."""
        if self.start["finished"]:
            return int(self.start["steps"])
        if self._available is None:
            local = _local_corpus_path(self.corpus)
            if local is None:
                self._available = self.n_samples
            else:
                self._available = sum(1 for _ in itertools.islice(iter_corpus_documents(self.corpus), self.n_samples))
        remaining = max(self._available - int(self.start["documents"]), 0)  # from the start of the current window
        done = int(self.start["steps"]) - int(self.start["skip"])
        return done + math.ceil(remaining / (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for index, (payload, cursor) in enumerate(self._steps()):
            if index % n_workers == worker_id:
                yield self._collate(payload, cursor)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def _groups(self) -> Iterator[tuple[tuple[str, list], dict[str, Any]]]:
        """``((kind, this process's texts or token ids), cursor after the group)`` for every group of documents.

        Windows of ``sort_window`` groups are read at once; inside a window the documents are ordered by length (of
        the text, a proxy of the token count; stable), so that a batch holds documents of similar length and little
        padding. The cursor of a group inside a window points at the window's start plus the groups done in it.
        """
        group = self.batch_size * self.world_size
        steps, documents, tokens, skip = (int(self.start[k]) for k in ("steps", "documents", "tokens", "skip"))
        steps -= skip  # the steps of the current window are counted again below, the done ones skipped
        if skip and (self.start.get("group"), self.start.get("window")) != (group, self.sort_window):
            raise ValueError(
                f"Cannot resume the statistics stream in the middle of a window of documents with batch_size x "
                f"processes = {group} and sort_window = {self.sort_window}: the checkpoint was written with "
                f"{self.start.get('group')} and {self.start.get('window')}. Resume with the same batch size, number of "
                "processes and sort_window."
            )
        docs = itertools.islice(iter_corpus_documents(self.corpus), documents, self.n_samples)
        while self.max_tokens is None or tokens < self.max_tokens:
            texts = list(itertools.islice(docs, group * self.sort_window))
            if not texts:
                return
            if self.max_tokens is None:
                items: list = texts
                window_tokens = tokens
            else:  # the budget is counted over the whole stream, in order, so every process tokenizes every text
                items = []
                window_tokens = tokens
                for ids in self._tokenize(texts):
                    if window_tokens >= self.max_tokens:
                        break
                    ids = ids[: self.max_tokens - window_tokens]
                    window_tokens += len(ids)
                    items.append(ids)
            if self.sort_window > 1:
                items = sorted(items, key=len)  # stable: ties keep the stream order
            kind = "texts" if self.max_tokens is None else "ids"
            chunks = [items[i : i + group] for i in range(0, len(items), group)]
            for k, chunk in enumerate(chunks):
                steps += 1
                if k < skip:
                    continue
                if k == len(chunks) - 1:
                    cursor = {"documents": documents + len(items), "tokens": window_tokens, "skip": 0}
                else:
                    cursor = {"documents": documents, "tokens": tokens, "skip": k + 1}
                yield (kind, chunk[self.rank :: self.world_size]), dict(cursor, steps=steps, group=group,
                                                                        window=self.sort_window)
            skip = 0
            documents += len(items)
            tokens = window_tokens

    def _steps(self) -> Iterator[tuple[tuple[str, list], dict[str, Any]]]:
        """:meth:`_groups` with ``cursor["finished"]`` set on the last one (one group of look-ahead)."""
        groups = self._groups()
        current = next(groups, None)
        while current is not None:
            following = next(groups, None)
            payload, cursor = current
            yield payload, dict(cursor, finished=following is None)
            current = following

    def _collate(self, payload: tuple[str, list], cursor: dict[str, Any]) -> dict[str, Any]:
        kind, items = payload
        seqs = [s for s in (self._tokenize(items) if kind == "texts" else items) if len(s) > 0]
        if seqs:
            input_ids, attention_mask = pad_right(seqs, self._pad_id)
        else:
            input_ids = attention_mask = torch.zeros((0, 0), dtype=torch.long)
        n_tokens = sum(len(s) for s in seqs)
        padded = n_tokens != input_ids.numel()
        token_index = attention_mask.flatten().nonzero().squeeze(1) if padded else torch.zeros(0, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_index": token_index,
            "n_tokens": n_tokens,
            "n_documents": len(items),
            "cursor": cursor,
        }


class _CorpusLoader(DataLoader):
    """The train loader of the job; stateful in Lightning's sense, its state is the cursor of the last processed step.

    Args:
        stream: The job's :class:`CorpusStream` (already starting at the job's restored cursor).
        num_workers: DataLoader worker processes (they read and tokenize ahead).
        pin_memory: Pin batches for a faster copy to the GPU.
        progress: Returns the cursor after the last processed step.
    """

    def __init__(
        self, stream: CorpusStream, num_workers: int, pin_memory: bool, progress: Callable[[], dict[str, Any]]
    ) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self._progress = progress

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last processed step."""
        return {"cursor": dict(self._progress()), "corpus": corpus_name(self.dataset.corpus)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checks that the stream starts where the checkpoint left it (the job built it from its restored cursor).

        Args:
            state_dict: What :meth:`state_dict` returned when the checkpoint was written.
        """
        saved = state_dict.get("cursor", {})
        start = self.dataset.start
        keys = ("steps", "documents", "tokens", "skip")
        if any(int(saved.get(k, 0)) != int(start[k]) for k in keys):
            raise RuntimeError(
                f"Cannot resume the statistics stream: the checkpoint's loader stopped at "
                f"{ {k: saved.get(k) for k in keys} } but the job's partial sums are at { {k: start[k] for k in keys} }"
            )


# --------------------------------------------------------------------------------------------------------------------
# the accumulation
# --------------------------------------------------------------------------------------------------------------------


def gram_blocks(dim: int) -> list[tuple[int, int]]:
    """The row blocks ``[a, b)`` of the upper-triangle accumulation of a ``dim x dim`` sum."""
    width = max(_GRAM_MIN_BLOCK, math.ceil(dim / _GRAM_BLOCKS))
    return [(a, min(a + width, dim)) for a in range(0, dim, width)]


class _Gram:
    """The running sum ``S = sum_t k_t k_t^T``, upper triangle only (by row blocks), in the accumulation dtype."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.total = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.blocks = gram_blocks(dim)

    def add(self, keys: torch.Tensor) -> None:
        keys = keys.to(self.total.dtype)
        if len(self.blocks) == 1:
            self.total.addmm_(keys.T, keys)
            return
        keys_t = keys.T
        for a, b in self.blocks:
            self.total[a:b, a:].addmm_(keys_t[a:b], keys[:, a:])

    def symmetric(self, total: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The full symmetric matrix: the upper triangle mirrored."""
        total = self.total if total is None else total
        if len(self.blocks) == 1:
            return total
        return total.triu() + total.triu(1).T


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the default process group (on a device its backend takes); returns a tensor on ``tensor``'s device."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and tensor.device.type != "cuda":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    elif backend == "gloo" and tensor.device.type != "cpu":
        work = tensor.cpu()
    else:
        work = tensor.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def _outer_world() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialized ``torch.distributed`` default group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree_on_missing(names: Sequence[str], missing: Sequence[str]) -> list[str]:
    """Inside a multi-process ``torch.distributed`` program: the modules missing on *any* process, so that all
    compute together (or none does); otherwise ``missing`` itself. Every process must call it.

    Args:
        names: All requested modules, in the same order on every process.
        missing: Those this process found no cache file for.
    """
    _, world = _outer_world()
    if world == 1:
        return list(missing)
    flags = torch.tensor([1 if name in missing else 0 for name in names], dtype=torch.long)
    flags = _all_reduce_sum(flags)
    return [name for name, flag in zip(names, flags.tolist()) if flag > 0]


# --------------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------------


class SecondMomentJob(LightningModule):
    """Computes ``C = E[k k^T]`` of the inputs of linear modules over a corpus and writes it to the stats cache.

    ``Trainer.fit(job)`` makes one pass over the stream (``max_epochs=1``); ``Trainer.fit(job, ckpt_path=...)``
    resumes an interrupted pass. After a complete pass, :attr:`moments` holds the matrices (float32, CPU) and
    :attr:`written` the cache files (on process 0). See the module docstring for the stream, resuming and DDP.

    Args:
        model: Hub id, local ``save_pretrained`` directory or ``tiny:<arch>`` spec (loaded in ``setup``, on every
            process, and moved to the Trainer's device), or a model already loaded (used where it is: the Trainer
            must run on its device).
        modules: Names of the measured linear modules.
        layers: Layer indices, turned into module names with ``module_template`` (alternative to ``modules``).
        module_template: Name template for ``layers`` (default by model type: the MLP out-projection).
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        n_samples: Number of documents (the first non-empty ones).
        max_tokens: Token budget over all processes (default: none).
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``.
        batch_size: Documents per forward pass (per process).
        max_length: Truncation length in tokens (default: the model's context length, at most 4096).
        tokenizer: The tokenizer, or its id/path (default: that of ``model`` when ``model`` is a name).
        model_dtype: Parameter dtype when the job loads the model.
        model_id: Name of the model in the cache (default: basename of the model's ``_name_or_path``).
        cache_dir: Where the cache files go (default: ``default_cache_dir() / "stats"``).
        num_workers: DataLoader processes that read and tokenize ahead.
        sort_window: Documents are ordered by length within windows of this many batches, to cut padding (1: corpus
            order). The result does not depend on it (up to float rounding).
        write_cache: Write the cache files at the end (process 0).
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "tiny:gpt2",
        modules: Optional[Sequence[str]] = None,
        layers: Optional[Sequence[int]] = None,
        module_template: Optional[str] = None,
        corpus: str = REFERENCE_CORPUS,
        n_samples: int = 100000,
        max_tokens: Optional[int] = None,
        dtype: str = "float32",
        batch_size: int = 16,
        max_length: Optional[int] = None,
        tokenizer: Any = None,
        model_dtype: str = "float32",
        model_id: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        num_workers: int = 0,
        sort_window: int = 64,
        write_cache: bool = True,
    ) -> None:
        super().__init__()
        if (modules is None) == (layers is None):
            raise ValueError("Give the measured modules either as modules=[names] or as layers=[indices], not both")
        if modules is not None:
            modules = [modules] if isinstance(modules, str) else list(modules)
            if not modules or len(set(modules)) != len(modules):
                raise ValueError(f"modules must name at least one module, each once; got {modules}")
        if layers is not None:
            layers = [int(layer) for layer in layers]
            if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
                raise ValueError(f"layers must hold distinct indices >= 0, got {layers}")
        _check_request(n_samples, max_tokens)
        for name, value, lowest in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                    ("sort_window", sort_window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be None or >= 1, got {max_length!r}")
        if isinstance(model, nn.Module) and tokenizer is None:
            raise ValueError("A model given as a module needs its tokenizer: pass tokenizer=...")
        self.acc_dtype, self.dtype_name = accumulation_dtype(dtype)
        self.module_names: Optional[list[str]] = modules
        self.layers = layers
        self.module_template = module_template
        self.corpus = str(corpus)
        self.n_samples = int(n_samples)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.batch_size = batch_size
        self.max_length = None if max_length is None else int(max_length)
        self.model_dtype = model_dtype
        self.model_id = model_id
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.sort_window = sort_window
        self.write_cache = bool(write_cache)
        self._model_name = None if isinstance(model, nn.Module) else str(model)
        self._set_lm(model if isinstance(model, nn.Module) else None)
        self.tokenizer = tokenizer
        # Lightning's DDP wrapper refuses a module without a parameter that requires a gradient (see module docstring).
        self._ddp_anchor = nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False
        # state (what a checkpoint holds)
        self._cursor: dict[str, Any] = dict(_START)
        self._grams: dict[str, _Gram] = {}
        self._n_tokens = 0  # this process's, since its start (or, on process 0, since the run's start)
        self._restored: Optional[dict[str, Any]] = None
        self._rank, self._world, self._mode = 0, 1, "single"
        self._lm_modes: dict[nn.Module, bool] = {}
        self.moments: dict[str, torch.Tensor] = {}
        self.written: dict[str, Path] = {}

    # The language model is deliberately *not* a registered submodule: Lightning would copy its weights into every
    # checkpoint, move it to the CPU at the end of fit (Strategy.teardown) - the outer run's model, when nested -, and
    # hand all its parameters to DDP.
    @property
    def lm(self) -> Optional[nn.Module]:
        """The language model whose modules are measured."""
        return self.__dict__.get("_lm")

    def _set_lm(self, model: Optional[nn.Module]) -> None:
        object.__setattr__(self, "_lm", model)

    @property
    def tokens_seen(self) -> int:
        """Tokens summed by this process so far (for the progress bar)."""
        return self._n_tokens

    @property
    def finished(self) -> bool:
        """Whether the whole stream has been summed."""
        return bool(self._cursor.get("finished"))

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.lm is None:
            self._set_lm(load_causal_lm(self._model_name, dtype=self.model_dtype))
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = load_tokenizer(self.tokenizer or self._model_name)
        model = self.lm
        if self.module_names is None:
            template = self.module_template or mlp_out_template(model)
            self.module_names = [template.format(layer) for layer in self.layers]
        self._in_dims = {name: input_dim(get_module(model, name)) for name in self.module_names}
        if self.max_length is None:
            self.max_length = _default_max_length(model)
        self.model_id = self.model_id or _default_model_id(model)
        local = _local_corpus_path(self.corpus)
        self._corpus_sha256 = _sha256(local) if local is not None else None
        if self.trainer.world_size > 1:
            self._rank, self._world, self._mode = self.trainer.global_rank, self.trainer.world_size, "trainer"
        else:
            rank, world = _outer_world()
            self._rank, self._world, self._mode = rank, world, ("outer" if world > 1 else "single")

    def _fingerprint(self) -> dict[str, Any]:
        """What must be the same for a checkpoint to resume this job."""
        return {
            "format": STATS_FORMAT,
            "model_id": self.model_id,
            "modules": sorted(self.module_names),
            "corpus": corpus_name(self.corpus),
            "corpus_sha256": self._corpus_sha256,
            "n_samples": self.n_samples,
            "max_tokens": self.max_tokens,
            "dtype": self.dtype_name,
            "max_length": self.max_length,
            # per-process partial sums (nested in a distributed program) resume only on the same process
            "shard": f"{self._rank}/{self._world}" if self._mode == "outer" else None,
        }

    @override
    def configure_optimizers(self) -> None:
        # No optimizer: the mock optimizer's step() advances global_step once per batch.
        return None

    @override
    def on_fit_start(self) -> None:
        model = self.lm
        root = self.trainer.strategy.root_device
        if self._model_name is not None:
            model.to(root)
        elif model_device(model) != root:
            raise ValueError(
                f"The model is on {model_device(model)} but the Trainer runs on {root}: run the job on the model's "
                "device (or give the model by name and the job moves it)"
            )
        device = model_device(model)
        self._grams = {name: _Gram(dim, self.acc_dtype, device) for name, dim in self._in_dims.items()}
        if self._restored is not None:
            state = self._restored
            # A checkpoint under a multi-process Trainer holds the sums all-reduced at that step: process 0 takes them.
            if not state["reduced"] or self._rank == 0:
                for name, gram in self._grams.items():
                    gram.total.copy_(state["totals"][name].to(device=device, dtype=self.acc_dtype))
                self._n_tokens = int(state["n_tokens"])
            self._restored = None
        self._lm_modes = {m: m.training for m in model.modules()}
        model.eval()

    @override
    def train_dataloader(self) -> DataLoader:
        stream = CorpusStream(
            self.corpus,
            self.tokenizer,
            n_samples=self.n_samples,
            batch_size=self.batch_size,
            max_length=self.max_length,
            max_tokens=self.max_tokens,
            rank=self._rank,
            world_size=self._world,
            start=self._cursor,
            sort_window=self.sort_window,
        )
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pin = model_device(self.lm).type == "cuda"
        return _CorpusLoader(stream, self.num_workers, pin_memory=pin, progress=lambda: self._cursor)

    # ------------------------------------------------------------------------------------------------------------
    # one batch
    # ------------------------------------------------------------------------------------------------------------

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["n_tokens"] > 0:
            self._accumulate(batch)
            self._n_tokens += int(batch["n_tokens"])
        self._cursor = dict(batch["cursor"])
        self.optimizers().step()

    def _accumulate(self, batch: dict[str, Any]) -> None:
        """One forward pass, stopped after the last measured module; its hooks add ``K^T K`` to each sum."""
        index = batch["token_index"] if batch["token_index"].numel() > 0 else None
        reached: set[str] = set()
        grams = self._grams

        def hook_for(name: str):
            def hook(_module, args):
                if name in reached:  # a module called twice in one forward counts once
                    return
                x = args[0]
                keys = x.reshape(-1, x.shape[-1])
                grams[name].add(keys if index is None else keys.index_select(0, index))
                reached.add(name)
                if len(reached) == len(grams):
                    raise _StopForward

            return hook

        handles = [get_module(self.lm, name).register_forward_pre_hook(hook_for(name)) for name in grams]
        try:
            with torch.no_grad():
                self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(reached) != len(grams):
            raise RuntimeError(
                f"The forward pass never reached {sorted(set(grams) - reached)}; are they part of the model's forward?"
            )

    # ------------------------------------------------------------------------------------------------------------
    # checkpointing
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        totals = {name: gram.total for name, gram in self._grams.items()}
        n_tokens = self._n_tokens
        reduced = self._mode == "trainer"
        if reduced:  # every process is here (Trainer.save_checkpoint dumps on all of them)
            totals = {name: _all_reduce_sum(total) for name, total in totals.items()}
            n_tokens = int(_all_reduce_sum(torch.tensor([n_tokens], dtype=torch.long, device=self.device)).item())
        checkpoint[_CKPT_KEY] = {
            "fingerprint": self._fingerprint(),
            "totals": {name: total.detach().cpu().clone() for name, total in totals.items()},
            "n_tokens": n_tokens,
            "cursor": dict(self._cursor),
            "reduced": reduced,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_CKPT_KEY)
        if state is None:
            raise ValueError("This checkpoint was not written by a SecondMomentJob: it holds no partial sums")
        saved, current = state["fingerprint"], self._fingerprint()
        changed = [key for key in current if saved.get(key) != current[key]]
        if changed:
            details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
            raise ValueError(
                f"Cannot resume: the checkpoint was written for different statistics ({details}). Resume with the same "
                "settings, or start without ckpt_path."
            )
        self._restored = state
        self._cursor = dict(_START, **state["cursor"])

    # ------------------------------------------------------------------------------------------------------------
    # the end
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_fit_end(self) -> None:
        self._restore_lm_modes()
        if not self.finished:
            if self._cursor["steps"] == 0:
                raise ValueError(f"Corpus {self.corpus!r} holds no non-empty text to compute statistics from")
            cursor = self._cursor
            done = int(cursor["documents"]) + int(cursor["skip"]) * int(cursor.get("group", 0))
            rank_zero_warn(
                f"The statistics job stopped after {cursor['steps']} steps ({done} documents), before the end of its "
                f"stream; nothing was written. Resume it with Trainer.fit(job, ckpt_path=<its checkpoint>)."
            )
            return
        totals = {name: gram.total for name, gram in self._grams.items()}
        n_tokens = self._n_tokens
        if self._world > 1:
            totals = {name: _all_reduce_sum(total) for name, total in totals.items()}
            device = next(iter(totals.values())).device
            n_tokens = int(_all_reduce_sum(torch.tensor([n_tokens], dtype=torch.long, device=device)).item())
        if n_tokens == 0:
            raise ValueError(f"Corpus {self.corpus!r} gave no tokens to compute statistics from")
        n_documents = int(self._cursor["documents"])
        if self.max_tokens is None and n_documents < self.n_samples:
            rank_zero_warn(
                f"Corpus {self.corpus!r} holds only {n_documents} documents (< n_samples={self.n_samples}); using all."
            )
        elif self.max_tokens is not None and n_tokens < self.max_tokens and n_documents < self.n_samples:
            rank_zero_warn(
                f"Corpus {self.corpus!r} holds only {n_tokens} tokens in {n_documents} documents "
                f"(< max_tokens={self.max_tokens}); using all."
            )
        moments = {
            name: (self._grams[name].symmetric(total) / n_tokens).cpu().contiguous() for name, total in totals.items()
        }
        self.moments = {name: moment.float() for name, moment in moments.items()}
        if self.write_cache and self._rank == 0:
            for name, moment in moments.items():
                path = stats_cache_path(
                    self.model_id, name, self.corpus, self.n_samples, self.dtype_name, cache_dir=self.cache_dir,
                    max_tokens=self.max_tokens,
                )
                metadata = expected_metadata(
                    self.model_id, name, self.corpus, self.n_samples, self.dtype_name, self.max_length,
                    max_tokens=self.max_tokens, corpus_sha256=self._corpus_sha256,
                )
                metadata.update(n_tokens=str(n_tokens), n_documents=str(n_documents))
                _save_atomic(path, moment, metadata)
                self.written[name] = path

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._restore_lm_modes()

    def _restore_lm_modes(self) -> None:
        for module, flag in self._lm_modes.items():
            module.training = flag
        self._lm_modes = {}


class _StatsProgressBar(TQDMProgressBar):
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


def _checkpoint_callback(dirpath: Path, every_n_steps: Optional[int]) -> ModelCheckpoint:
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
def _quiet_lightning() -> Iterator[None]:
    """Silences Lightning's info lines ("GPU available", "`Trainer.fit` stopped") and its by-design warnings about
    this job (no optimizer, a stream with a length) in a nested run; other warnings stay."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------------------------
# running the job on a model in memory (what the editors call)
# --------------------------------------------------------------------------------------------------------------------


def compute_second_moments(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    corpus: str,
    n_samples: int = 100000,
    dtype: str = "float32",
    batch_size: int = 16,
    max_length: Optional[int] = None,
    max_tokens: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    model_id: Optional[str] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every_n_steps: Optional[int] = None,
    num_workers: int = 0,
    progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """Runs a :class:`SecondMomentJob` on ``model`` where it is, in a single-device Trainer of its own; writes the
    cache files and returns ``{module: C}`` (float32, CPU). Safe to call from inside another Trainer's fit.

    The partial sums are checkpointed to ``checkpoint_dir/last.ckpt`` (default: a folder under the cache named after
    the request, removed after success); a call that finds such a checkpoint resumes from it. Inside a multi-process
    ``torch.distributed`` program every process must call this together (see the module docstring).

    Args:
        model: The causal LM (not moved, copied or put in train mode).
        tokenizer: Its tokenizer.
        module_names: The measured modules.
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        n_samples: Number of documents.
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``.
        batch_size: Documents per forward pass.
        max_length: Truncation length (default: the model's context length, at most 4096).
        max_tokens: Token budget (default: none).
        cache_dir: Where the cache files go (default: ``default_cache_dir() / "stats"``).
        model_id: Name of the model in the cache (default: from its config).
        checkpoint_dir: Where the partial sums are kept (per process ``rank<r>-of-<n>`` inside a distributed
            program).
        checkpoint_every_n_steps: Checkpoint every this many batches (default: every 10 minutes).
        num_workers: DataLoader processes that read and tokenize ahead.
        progress_bar: Show a progress bar (on process 0).
    """
    rank, world = _outer_world()
    job = SecondMomentJob(
        model=model,
        tokenizer=tokenizer,
        modules=list(module_names),
        corpus=corpus,
        n_samples=n_samples,
        max_tokens=max_tokens,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        model_id=model_id or _default_model_id(model),
        cache_dir=cache_dir,
        num_workers=num_workers,
    )
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
    ckpt_path = str(last) if last.exists() else None
    if ckpt_path is not None:
        rank_zero_info(f"Resuming the statistics of {', '.join(module_names)} from {last}")
    with _quiet_lightning():
        trainer = Trainer(
            accelerator=accelerator,
            devices=[device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else 1,
            strategy=SingleDeviceStrategy(device=device),
            logger=False,
            callbacks=[_checkpoint_callback(checkpoint_dir, checkpoint_every_n_steps)]
            + ([_StatsProgressBar()] if show_bar else []),
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


def _partial_dir(job: SecondMomentJob, model: nn.Module, cache_dir: Optional[Union[str, Path]]) -> Path:
    """``<cache>/.partial/<model>__<hash of the request>``: where a nested job keeps its partial sums."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    local = _local_corpus_path(job.corpus)
    request = {
        "model_id": job.model_id,
        "modules": sorted(job.module_names),
        "corpus": corpus_name(job.corpus),
        "corpus_sha256": _sha256(local) if local is not None else None,
        "n_samples": job.n_samples,
        "max_tokens": job.max_tokens,
        "dtype": job.dtype_name,
        "max_length": job.max_length or _default_max_length(model),
    }
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return root / ".partial" / f"{_slug(job.model_id)}__{digest}"


# --------------------------------------------------------------------------------------------------------------------
# prune-edit stats
# --------------------------------------------------------------------------------------------------------------------


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
    max_length = args.max_length or _default_max_length(stub)
    _check_request(args.n_samples, args.max_tokens)
    local = _local_corpus_path(args.corpus)
    sha = _sha256(local) if local is not None else None
    paths = {
        name: stats_cache_path(model_id, name, args.corpus, args.n_samples, args.dtype, cache_dir=args.cache_dir,
                               max_tokens=args.max_tokens)
        for name in modules
    }
    missing = []
    for name, file in paths.items():
        expected = expected_metadata(model_id, name, args.corpus, args.n_samples, args.dtype, max_length,
                                     max_tokens=args.max_tokens, corpus_sha256=sha)
        if args.recompute or not file.exists() or _load_cache(file, expected, None) is None:
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
        callbacks: list = [_StatsProgressBar()]
        if args.checkpoint_dir is not None:
            callbacks.append(_checkpoint_callback(Path(args.checkpoint_dir), args.checkpoint_every))
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
        try:
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
