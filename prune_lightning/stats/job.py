r"""The statistics job: ``C = E[k k^T]`` of the inputs of one or several linear modules, as a Lightning run.

:class:`SecondMomentJob` is a ``LightningModule`` whose ``training_step`` accumulates one batch of documents::

    S_m += K_m^T K_m          for every measured module m     (K_m: its inputs at the batch's non-padding tokens)
    N   += number of non-padding tokens

and whose end writes ``C_m = S_m / N`` to the cache that the editors read (:func:`.cache.stats_cache_path`, one
safetensors file per module, with the metadata of :func:`.cache.expected_metadata` - the model's revision, the
tokenizer's hash, the corpus, the forward precision - plus what was read: ``n_tokens``, ``n_documents``,
``sample_sha256`` and, where ``datasets`` gives one, ``dataset_fingerprint``; :mod:`.provenance`). The forward pass
may run in lower precision (``forward_precision``: bfloat16 autocast or TF32, :mod:`.precision`) while the sums stay
in the accumulation dtype. One forward pass feeds every measured module and stops at the last of them (nothing above
it is computed). There is no optimizer: ``configure_optimizers`` returns ``None`` and each step calls the mock
optimizer's ``step()``, so ``global_step`` counts batches (``max_steps``, ``every_n_train_steps`` work as usual). The
documents come from :class:`~.corpus.CorpusStream`.

Only the upper triangle of each ``S_m`` is computed, by row blocks (``S[a:b, a:] += K[:, a:b]^T K[:, a:]``; about 8
blocks, none narrower than 256), which saves up to 44% of the multiply-adds (:class:`GramSum`); the lower triangle
is mirrored when the moment is written.

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
one-element dummy (``_ddp_anchor``); there is no backward pass, so no gradient is ever reduced. Inside a program that
is already distributed (an outer DDP run), every process runs a single-device job on its own share and the sums are
all-reduced over the existing process group (:func:`outer_world`, :func:`agree_on_missing`; see :mod:`.run`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from prune_lightning.models import get_module, input_dim, load_causal_lm, load_tokenizer, mlp_out_template, model_device
from prune_lightning.stats.cache import (STATS_FORMAT, accumulation_dtype, check_max_length, check_request,
                                         default_model_id, expected_metadata, model_revision, save_moment,
                                         stats_cache_path)
from prune_lightning.stats.corpus import (REFERENCE_CORPUS, STREAM_START, CorpusLoader, CorpusStream, corpus_name,
                                          file_sha256, local_corpus_path)
from prune_lightning.stats.precision import (accumulation_context, check_forward_precision, forward_context,
                                             precision_warning)
from prune_lightning.stats.provenance import tokenizer_sha256

__all__ = ["EXPECTED_WARNINGS", "GramSum", "SecondMomentJob", "agree_on_missing", "gram_blocks", "outer_world"]

# By design: no optimizer (the job only sums), a stream whose length is an upper bound where it cannot be known, and
# no DataLoader workers by default (tokenizing is cheap next to the forward passes).
EXPECTED_WARNINGS = (
    r".*configure_optimizers` returned `None`.*",
    r".*Your `IterableDataset` has `__len__` defined.*",
    r".*does not have many workers which may be a bottleneck.*",
    # the checkpoint of a step holds the sums *with* that step's batch, which is what resuming needs
    r".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*",
)

for _message in EXPECTED_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)

_CKPT_KEY = "second_moment_job"

_GRAM_BLOCKS = 8

_GRAM_MIN_BLOCK = 256


class _StopForward(Exception):
    """Raised by a hook once the last measured module has its keys: the layers above are not needed."""


def gram_blocks(dim: int) -> list[tuple[int, int]]:
    """The row blocks ``[a, b)`` of the upper-triangle accumulation of a ``dim x dim`` sum."""
    width = max(_GRAM_MIN_BLOCK, math.ceil(dim / _GRAM_BLOCKS))
    return [(a, min(a + width, dim)) for a in range(0, dim, width)]


class GramSum:
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


def outer_world() -> tuple[int, int]:
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
    _, world = outer_world()
    if world == 1:
        return list(missing)
    flags = torch.tensor([1 if name in missing else 0 for name in names], dtype=torch.long)
    flags = _all_reduce_sum(flags)
    return [name for name, flag in zip(names, flags.tolist()) if flag > 0]


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
        forward_precision: The forward pass's precision: ``"model"`` (default: the model's dtype, full-precision
            matmuls), ``"bfloat16"`` (autocast) or ``"tf32"`` (TF32 matmuls; GPUs only). The sums stay in ``dtype``.
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
        forward_precision: Optional[str] = None,
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
        check_request(n_samples, max_tokens)
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
        self.forward_precision = check_forward_precision(forward_precision) or "model"
        self._tokenizer_sha256: Optional[str] = None
        self._model_name = None if isinstance(model, nn.Module) else str(model)
        self._set_lm(model if isinstance(model, nn.Module) else None)
        self.tokenizer = tokenizer
        # Lightning's DDP wrapper refuses a module without a parameter that requires a gradient (see module docstring).
        self._ddp_anchor = nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False
        # state (what a checkpoint holds)
        self._cursor: dict[str, Any] = dict(STREAM_START)
        self._grams: dict[str, GramSum] = {}
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
        self._tokenizer_sha256 = tokenizer_sha256(self.tokenizer)
        model = self.lm
        if self.module_names is None:
            template = self.module_template or mlp_out_template(model)
            self.module_names = [template.format(layer) for layer in self.layers]
        self._in_dims = {name: input_dim(get_module(model, name)) for name in self.module_names}
        self.max_length = check_max_length(model, self.max_length)
        self.model_id = self.model_id or default_model_id(model)
        local = local_corpus_path(self.corpus)
        self._corpus_sha256 = file_sha256(local) if local is not None else None
        if self.trainer.world_size > 1:
            self._rank, self._world, self._mode = self.trainer.global_rank, self.trainer.world_size, "trainer"
        else:
            rank, world = outer_world()
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
            "tokenizer_sha256": self._tokenizer_sha256,
            "forward_precision": self.forward_precision,
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
        warning = precision_warning(self.forward_precision, device.type)
        if warning:
            rank_zero_warn(warning)
        self._grams = {name: GramSum(dim, self.acc_dtype, device) for name, dim in self._in_dims.items()}
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
        return CorpusLoader(stream, self.num_workers, pin_memory=pin, progress=lambda: self._cursor)

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
        device_type = model_device(self.lm).type

        def hook_for(name: str):
            def hook(_module, args):
                if name in reached:  # a module called twice in one forward counts once
                    return
                x = args[0]
                keys = x.reshape(-1, x.shape[-1])
                with accumulation_context(device_type):  # the sums in full precision, whatever the forward's
                    grams[name].add(keys if index is None else keys.index_select(0, index))
                reached.add(name)
                if len(reached) == len(grams):
                    raise _StopForward

            return hook

        handles = [get_module(self.lm, name).register_forward_pre_hook(hook_for(name)) for name in grams]
        try:
            with torch.no_grad(), forward_context(self.forward_precision, device_type):
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
        # A key an older checkpoint does not hold is not compared.
        changed = [key for key in current if key in saved and saved[key] != current[key]]
        if changed:
            details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
            raise ValueError(
                f"Cannot resume: the checkpoint was written for different statistics ({details}). Resume with the same "
                "settings, or start without ckpt_path."
            )
        self._restored = state
        self._cursor = dict(STREAM_START, **state["cursor"])

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
                    model_revision=model_revision(self.lm), tokenizer_sha256=self._tokenizer_sha256,
                    forward_precision=self.forward_precision,
                )
                metadata.update(n_tokens=str(n_tokens), n_documents=str(n_documents), source="computed",
                                model_dtype=str(next(self.lm.parameters()).dtype).removeprefix("torch."))
                for key in ("sample_sha256", "dataset_fingerprint"):
                    if self._cursor.get(key):
                        metadata[key] = str(self._cursor[key])
                save_moment(path, moment, metadata)
                self.written[name] = path

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._restore_lm_modes()

    def _restore_lm_modes(self) -> None:
        for module, flag in self._lm_modes.items():
            module.training = flag
        self._lm_modes = {}
