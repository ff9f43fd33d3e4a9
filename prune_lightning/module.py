"""``SequentialEditor``: sequential model editing as a LightningModule.

``Trainer.fit`` walks a stream of edit requests; one training step is one edit batch. The step asks the editor
(ROME, ...) for the update of each edited matrix, writes it into the parameter and records it in the module's
:class:`~prune_lightning.registry.EditRegistry` (``W_0`` once, the accumulated ``dW`` as low-rank factors). Callbacks
act after each write: PRUNE restrains ``dW``, the condition-number monitor logs ``kappa``, evaluators score the model.

There is no optimizer: ``configure_optimizers`` returns ``None`` (Lightning then hands out a mock optimizer) and each
step calls its ``step()``, which is what advances ``global_step`` - so ``max_steps``, ``every_n_train_steps``
checkpoints and step-indexed logging all count edit batches.

At the end of fit the edited model (and its tokenizer) is saved with ``save_pretrained`` (safetensors) into
``<run dir>/edited_model``, ready for ``AutoModelForCausalLM.from_pretrained``.

Several processes (``strategy="ddp"``, ``"ddp_spawn"``, any ``DDPStrategy``; see :mod:`prune_lightning.distributed`).
Every rank holds the whole model and edits every request, in order - a data-parallel split of the stream would make
the replicas drift apart. What is spread is the work inside a step: the editor runs inside
:func:`~prune_lightning.distributed.split_work` (ROME splits its context-template rows across the ranks), the update
factors it returns are broadcast from rank 0 (``(m + n) x r`` numbers) so every rank writes the same bits, and each
step first checks that all ranks received the same batch. Lightning wraps the module in ``DistributedDataParallel``,
which refuses a module without a trainable parameter and would otherwise allocate gradient buckets as large as the
model; the model's parameters are therefore frozen for the fit (editors enable what they differentiate themselves)
and the module gets a one-element ``ddp_anchor`` parameter, which is never used, never saved and never loaded.
Under ``ddp_spawn`` the process group is destroyed when the worker's run ends (STACK.md: otherwise exit code 134 now
and then); with ``strategy="ddp"`` the caller does it (``prune-edit`` does).

A sharded model (``ModelParallelStrategy``, FSDP2): :meth:`SequentialEditor.configure_model` shards it, one unit per
decoder layer. Every rank still edits every request in order; the editor gathers only the matrices it writes, and
splits its rows evenly (each forward and backward of a sharded model is a collective, so a rank with fewer rows pads
its batch); the updates are broadcast from rank 0 and the registry writes each rank's shard. The model is not frozen
(there is no ``DistributedDataParallel`` wrapper), and the module hands Lightning an optimizer that changes nothing,
because the strategy's checkpoints need a real one. DeepSpeed and Lightning's ``FSDPStrategy`` (FSDP1) are refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override

from prune_lightning import distributed
from prune_lightning.editors.base import Editor, implements_editor
from prune_lightning.models import context_length, is_sharded_model, load_causal_lm, load_tokenizer, shard_model
from prune_lightning.loggers import EDITS_KEY
from prune_lightning.registry import EditRegistry
from prune_lightning.safety import (BadUpdateError, check_request_lengths, check_save_target, editor_settings,
                                    frobenius_norm, run_signature, save_model, signature_changes, update_problem)
from prune_lightning.strategies import (NoUpdates, broadcast_updates, check_same_batch, drop_ddp_anchor, fsdp_mesh,
                                        ignore_ddp_anchor, strategy_kind, workers_end_with_run)

# Both are by design here: there is no optimizer (edits are closed-form writes), and the model stays in eval mode
# (no dropout while editors compute updates and evaluators score the model).
warnings.filterwarnings("ignore", message=r".*configure_optimizers` returned `None`.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

#: What makes a Trainer an editing loop: one pass over the request stream, no sanity validation, every step logged.
_BAD_UPDATE_ACTIONS = ("raise", "skip")

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}


class SequentialEditor(LightningModule):
    """A causal LM, its tokenizer and an editor; ``training_step`` applies one edit batch.

    Args:
        model: Hugging Face hub id, local ``save_pretrained`` directory, or ``tiny:gpt2`` / ``tiny:llama`` (a tiny
            model built from config, for offline runs and tests).
        editor: The editing method (default: ``ROME()`` with its GPT-2 XL hyperparameters).
        tokenizer: Tokenizer id or path, if it differs from ``model``.
        dtype: Parameter dtype of the model (``float32``, ``bfloat16``, ``float16``).
        offload_w0: Keep the copies of the original matrices ``W_0`` in CPU memory.
        dense_rank_fraction: An accumulated update is kept as low-rank factors until its rank passes this fraction
            of ``min(m, n)``; then it is kept dense.
        save_edited_model: Save the edited model with ``save_pretrained`` at the end of fit.
        edited_model_dir: Where to save it; default ``<run dir>/edited_model``.
        verbose: Print one line per edit batch (case, subject, new target, loss, time).
        eval_batch_size: Prompts per forward pass when ``validate`` / ``test`` score the edit quality.
        overwrite: Let the save replace a folder that prune-lightning did not write (refused by default).
        on_bad_update: What to do with an update that is not finite: ``"raise"`` (stop, naming the requests and the
            matrix; nothing is written) or ``"skip"`` (leave the weights as they were, warn, count it in
            ``edit/skipped`` and go on).
        revision: The hub revision (branch, tag or commit) of the model and tokenizer; recorded in the saved config.
    """

    def __init__(
        self,
        model: str = "tiny:gpt2",
        editor: Optional[Editor] = None,
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        offload_w0: bool = False,
        dense_rank_fraction: float = 0.25,
        save_edited_model: bool = True,
        edited_model_dir: Optional[str] = None,
        verbose: bool = True,
        eval_batch_size: int = 16,
        overwrite: bool = False,
        on_bad_update: str = "raise",
        revision: Optional[str] = None,
    ) -> None:
        super().__init__()
        if on_bad_update not in _BAD_UPDATE_ACTIONS:
            raise ValueError(f"on_bad_update must be one of {_BAD_UPDATE_ACTIONS}, got {on_bad_update!r}")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be an int >= 1, got {eval_batch_size!r}")
        self.save_hyperparameters(ignore=["editor"])
        if editor is None:
            from prune_lightning.editors import ROME

            editor = ROME()
        if not implements_editor(editor):
            raise TypeError(
                f"editor must be an Editor or implement its methods (parameter_names, setup, compute_update); "
                f"got {type(editor).__name__}"
            )
        self.model = load_causal_lm(model, dtype=dtype, revision=revision)
        self.tokenizer = load_tokenizer(tokenizer or model, revision=revision)
        self.editor = editor
        self.edit_registry = EditRegistry(offload=offload_w0, dense_rank_fraction=dense_rank_fraction)
        self.requests_edited = 0
        self.requests_skipped = 0
        self.automatic_optimization = False
        self._editor_ready = False
        self._replicated = False  # editing on several processes (set in setup)
        self._split_rows = False  # the editor spreads the rows of its optimisation over the ranks
        self._even_split = False  # ... padding them to as many on every rank (a sharded model)
        self._grad_flags: dict[nn.Parameter, bool] = {}
        self.register_state_dict_post_hook(drop_ddp_anchor)
        self.register_load_state_dict_post_hook(ignore_ddp_anchor)

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self._trainer is not None and self.trainer.world_size > 1:
            if strategy_kind(self.trainer) == "replicas":
                self._prepare_replicas()
            else:  # sharded: the parameters stay as they are (no DistributedDataParallel wrapper)
                self._replicated = self._split_rows = distributed.is_distributed()
                self._even_split = True  # each forward and backward is a collective: as many rows on every rank
        if self._trainer is not None and not isinstance(self.trainer.strategy, ModelParallelStrategy):
            # The editor's set-up (second moments, generated templates) and the W_0 copies are made where the edits
            # run: Lightning would move the model there only after this hook. (A model to be sharded stays where it
            # is until configure_model has sharded it.)
            self.model.to(self.trainer.strategy.root_device)
        if self._trainer is not None and self.hparams.save_edited_model:
            check_save_target(self.edited_model_dir, self.hparams.overwrite)  # before the first edit, not after the last
        self.prepare_editor()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        requests = getattr(datamodule, "requests", None)
        if requests:  # once more, now that the editor's context templates are known exactly
            self.check_requests(requests)

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shards the model with FSDP2 over the strategy's device mesh.

        Every decoder layer is a shard unit, the embeddings, final norm and head the root unit
        (:func:`~prune_lightning.models.shard_model`). The mesh Lightning builds has the dimensions
        ``(data_parallel, tensor_parallel)`` - by default (nodes, devices per node); the model is sharded across all
        of them when one has size 1, and with two (several nodes of several devices) replicated across nodes and
        sharded within a node (HSDP). No tensor parallelism is applied. Runs after :meth:`setup` (the editor's
        statistics and ``W_0`` are taken from the whole model) and may run again (a later validate / test).
        """
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        shard_model(self.model, fsdp_mesh(self.device_mesh))

    def _prepare_replicas(self) -> None:
        """Before Lightning wraps the module in ``DistributedDataParallel``: freeze the model, add the anchor."""
        self._replicated = distributed.is_distributed()
        self._split_rows = self._replicated
        if not self._grad_flags:
            self._grad_flags = {p: p.requires_grad for p in self.model.parameters()}
        self.model.requires_grad_(False)
        if "ddp_anchor" not in self._parameters:
            # DDP needs one trainable parameter; nothing uses it, so its gradient bucket is four bytes.
            self.ddp_anchor = nn.Parameter(torch.zeros(1, device=next(self.model.parameters()).device))

    @override
    def teardown(self, stage: str) -> None:
        for param, flag in self._grad_flags.items():
            param.requires_grad_(flag)
        self._grad_flags = {}
        self._replicated = self._split_rows = self._even_split = False
        if self._trainer is not None and workers_end_with_run(self.trainer) and dist.is_initialized():
            # ddp_spawn / ddp_fork: this worker process ends now. Destroying the group avoids the intermittent
            # "terminate called without an active exception" (exit 134) at exit (STACK.md).
            dist.barrier()
            dist.destroy_process_group()

    def prepare_editor(self) -> None:
        """Runs the editor's set-up (statistics, templates) and starts tracking its matrices; idempotent."""
        if self._editor_ready:
            return
        self.editor.setup(self.model, self.tokenizer)
        templates = getattr(self.editor, "context_templates", None)
        if self._replicated and templates is not None and not distributed.same_on_all_ranks(list(templates)):
            # Each rank takes its share of the template rows: different templates would mix into one update.
            raise RuntimeError(
                f"The ranks made different context templates for {type(self.editor).__name__} (sampling from the "
                "model is not bit-identical across the devices?). Pass context_templates explicitly."
            )
        self.edit_registry.track(self.model, self.edited_parameter_names)
        self._editor_ready = True

    @override
    def on_fit_start(self) -> None:
        # A sharded model reached its device after setup (where W_0 was copied from the whole model on the CPU):
        # the registry follows it. (Otherwise the model was moved before the copies were made.)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            self.edit_registry.to_parameter_devices()

    def check_requests(self, requests: Sequence) -> None:
        """Refuses, naming the request and the field, a prompt that would not fit the model's context with its target
        and the editor's longest context template (:func:`~prune_lightning.safety.check_request_lengths`).

        ``EditDataModule.setup`` calls it before any output of the run is written.

        Args:
            requests: ``EditRequest`` objects.
        """
        prompt_overhead = getattr(self.editor, "prompt_overhead", None)
        overhead = int(prompt_overhead(self.tokenizer)) if callable(prompt_overhead) else 0
        check_request_lengths(requests, self.tokenizer, context_length(self.model), overhead)

    @property
    def edited_parameter_names(self) -> list[str]:
        return list(self.editor.parameter_names(self.model))

    @override
    def configure_optimizers(self) -> Optional[torch.optim.Optimizer]:
        # No optimizer: the mock optimizer's step() advances global_step once per edit batch. ModelParallelStrategy
        # checkpoints its optimizers with torch's get_optimizer_state_dict, which needs a real one: there it gets
        # one whose step() does nothing.
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            return NoUpdates([next(self.model.parameters())])
        return None

    # ------------------------------------------------------------------------------------------------------------
    # editing
    # ------------------------------------------------------------------------------------------------------------

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @override
    def training_step(self, batch: Sequence, batch_idx: int) -> None:
        start = time.perf_counter()
        if self._replicated:
            check_same_batch(batch, batch_idx)
        metrics = self.apply_edit(batch)
        metrics["edit/seconds"] = time.perf_counter() - start
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        self.optimizers().step()
        if self.hparams.verbose:
            self._print_edit(batch, metrics)

    def apply_edit(self, requests: Sequence) -> dict[str, float]:
        """Computes the editor's updates for one batch, writes them and records them; returns metrics to log."""
        self.prepare_editor()
        with distributed.split_work(even=self._even_split) if self._split_rows else contextlib.nullcontext():
            updates = self.editor.compute_update(self.model, self.tokenizer, requests)
        unknown = [name for name in updates if name not in self.edit_registry]
        if unknown:
            raise RuntimeError(
                f"{type(self.editor).__name__} returned updates for {unknown}, which are not among its "
                f"parameter_names() {self.edited_parameter_names}"
            )
        if self._replicated:
            updates = broadcast_updates(updates)
        metrics: dict[str, float] = {}
        problems = {name: problem for name, update in updates.items() if (problem := update_problem(update))}
        if problems:  # nothing of this batch is written (the same decision on every rank: the updates are shared)
            matrices = "; ".join(f"{name} {problem}" for name, problem in problems.items())
            message = (f"{type(self.editor).__name__} computed an update that cannot be written ({matrices}) for "
                       f"{', '.join(r.where for r in requests)}")
            if self.hparams.on_bad_update == "raise":
                raise BadUpdateError(f"{message}. The weights are as before this batch. on_bad_update='skip' leaves "
                                     "such requests out and goes on.")
            rank_zero_warn(f"{message}; skipped (on_bad_update='skip'): the weights are as before this batch.")
            discard = getattr(self.editor, "discard_last_update", None)
            if callable(discard):  # an editor's state (AlphaEdit's accumulated keys) forgets the batch too
                discard()
            self.requests_skipped += len(requests)
        else:
            with torch.no_grad():
                for name, update in updates.items():
                    entry = self.edit_registry[name]
                    entry.record(update)
                    self.edit_registry.write([name])
                    metrics[f"edit/update_norm/{name}"] = frobenius_norm(update)
            self.requests_edited += len(requests)
        metrics[EDITS_KEY] = float(self.requests_edited)
        metrics["edit/skipped"] = float(self.requests_skipped)
        for key, value in (getattr(self.editor, "last_metrics", None) or {}).items():
            metrics[f"edit/{key}"] = float(value)
        return metrics

    def _print_edit(self, batch: Sequence, metrics: dict[str, float]) -> None:
        first = batch[0]
        more = f" (+{len(batch) - 1} more)" if len(batch) > 1 else ""
        loss = metrics.get("edit/loss")
        loss_text = f", target loss {loss:.3f}" if loss is not None and math.isfinite(loss) else ""
        self.print(
            f"edit {self.global_step}: case {first.case_id} {first.subject!r} -> {first.target_new!r}{more}"
            f"{loss_text}, {metrics['edit/seconds']:.2f} s"
        )

    # ------------------------------------------------------------------------------------------------------------
    # validate / test: edit quality of the requests
    # ------------------------------------------------------------------------------------------------------------

    def _quality_metrics(self, stage: str) -> Any:
        if not hasattr(self, "_quality"):
            from prune_lightning.metrics.quality import EditQualityMetrics

            self._quality = {s: EditQualityMetrics() for s in ("val", "test")}
        # On the module's device: that is where NCCL sums the states across ranks.
        return self._quality[stage].to(self.device)

    def _quality_step(self, batch: Sequence, stage: str) -> None:
        self._quality_metrics(stage).update(self.model, self.tokenizer, batch, batch_size=self.hparams.eval_batch_size)

    def _quality_epoch_end(self, stage: str) -> None:
        metrics = self._quality_metrics(stage)
        # Every rank computes (compute() sums the states of all ranks, which each scored a shard of the requests); a
        # kind no rank scored is not logged. Names: <stage>/teacher_forced/<kind>/<score>
        # (prune_lightning.metrics.quality).
        values = {f"{stage}/{key}": value for key, value in metrics.compute().items()}
        metrics.reset()
        if values:
            self.log_dict(values, sync_dist=False)

    @override
    def validation_step(self, batch: Sequence, batch_idx: int) -> None:
        """Teacher-forced edit quality of the requests of this batch on the current model (``val/teacher_forced/...``,
        the names of :mod:`prune_lightning.metrics.quality`)."""
        self._quality_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._quality_epoch_end("val")

    @override
    def test_step(self, batch: Sequence, batch_idx: int) -> None:
        """Teacher-forced edit quality of the requests of this batch on the current model (``test/teacher_forced/...``,
        the names of :mod:`prune_lightning.metrics.quality`)."""
        self._quality_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._quality_epoch_end("test")

    # ------------------------------------------------------------------------------------------------------------
    # checkpoint and output
    # ------------------------------------------------------------------------------------------------------------

    def run_signature(self) -> dict[str, str]:
        """What defines this run and must not change on resume: model, editor settings, matrices, restraints."""
        restraints = [c.state_key for c in self.trainer.callbacks if getattr(type(c), "rewrites_weights", False)] \
            if self._trainer is not None else []
        return run_signature(self.hparams.model, self.hparams.tokenizer, self.hparams.dtype, self.editor,
                             self.edited_parameter_names, restraints)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["edit_registry"] = self.edit_registry.state_dict()
        checkpoint["requests_edited"] = self.requests_edited
        checkpoint["requests_skipped"] = self.requests_skipped
        checkpoint["run_signature"] = self.run_signature()
        editor_state = self.editor.state_dict() if callable(getattr(self.editor, "state_dict", None)) else {}
        if editor_state:  # e.g. AlphaEdit's accumulated keys; restored after the editor's setup (a fresh state)
            checkpoint["editor_state"] = editor_state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("run_signature")
        if saved is not None:
            changes = signature_changes(saved, self.run_signature())
            if changes:
                raise ValueError(
                    "Cannot resume: the checkpoint was written by a run with other settings (" + "; ".join(changes)
                    + "). Resume with the same model, editor, edited matrices and restraints, or start a new run "
                    "without ckpt_path. (Where to save and what to log may change.)"
                )
        if "edit_registry" in checkpoint:
            self.edit_registry.load_state_dict(checkpoint["edit_registry"], model=self.model)
        self.requests_edited = int(checkpoint.get("requests_edited", 0))
        self.requests_skipped = int(checkpoint.get("requests_skipped", 0))
        if "editor_state" in checkpoint:
            self.editor.load_state_dict(checkpoint["editor_state"])

    @override
    def on_train_end(self) -> None:
        # Callbacks' on_train_end (post-hoc restraint) has already run: Lightning calls them before the module's.
        if self.hparams.save_edited_model:
            self.save_edited_model(self.edited_model_dir)

    @property
    def edited_model_dir(self) -> Path:
        if self.hparams.edited_model_dir:
            return Path(self.hparams.edited_model_dir)
        run_dir = self.trainer.log_dir if self.trainer.log_dir else self.trainer.default_root_dir
        return Path(run_dir) / "edited_model"

    def save_edited_model(self, path: os.PathLike) -> Optional[Path]:
        """Saves model and tokenizer with ``save_pretrained`` (safetensors) on rank 0, atomically, with a marker
        file holding the run's provenance (:func:`~prune_lightning.safety.save_model`). A folder that prune-lightning
        did not write is refused unless ``overwrite``. A sharded model is gathered into rank 0's CPU memory first
        (every rank must call this); returns the path on rank 0, ``None`` on the others."""
        state_dict = None
        if is_sharded_model(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(self.model, options=options)  # whole tensors on rank 0 only
            # One entry per tensor, as save_pretrained writes an unsharded model: tied weights (GPT-2's head and
            # input embedding) are gathered as copies, of which named_parameters() names only the first.
            names = {name for name, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
            state_dict = {name: value for name, value in state_dict.items() if name in names}
        if distributed.rank() != 0:
            return None
        provenance = {"format": "prune_lightning.edited_model/1", "version": _package_version(), "model": self.hparams.model,
                      "revision": self.hparams.revision, "editor": editor_settings(self.editor),
                      "edited_matrices": self.edited_parameter_names, "requests_edited": self.requests_edited,
                      "requests_skipped": self.requests_skipped}
        path = save_model(self.model, self.tokenizer, path, provenance, state_dict=state_dict,
                          overwrite=self.hparams.overwrite)
        print(f"Edited model saved to {path}", flush=True)  # rank 0 only (the others returned above)
        return path


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prune-lightning")
    except PackageNotFoundError:  # run from a checkout
        return "unknown"
