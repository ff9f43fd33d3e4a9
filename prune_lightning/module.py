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
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from prune_lightning.editors.base import Editor, LowRankUpdate, Update, implements_editor
from prune_lightning.models import load_causal_lm, load_tokenizer
from prune_lightning.registry import EditRegistry

# Both are by design here: there is no optimizer (edits are closed-form writes), and the model stays in eval mode
# (no dropout while editors compute updates and evaluators score the model).
warnings.filterwarnings("ignore", message=r".*`configure_optimizers` returned `None`.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["editor"])
        if editor is None:
            from prune_lightning.editors import ROME

            editor = ROME()
        if not implements_editor(editor):
            raise TypeError(
                f"editor must be an Editor or implement its methods (parameter_names, setup, compute_update); "
                f"got {type(editor).__name__}"
            )
        self.model = load_causal_lm(model, dtype=dtype)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.editor = editor
        self.edit_registry = EditRegistry(offload=offload_w0, dense_rank_fraction=dense_rank_fraction)
        self.requests_edited = 0
        self.automatic_optimization = False
        self._editor_ready = False

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if self._trainer is not None and self.trainer.world_size > 1:
            raise NotImplementedError(
                f"Sequential editing under {strategy} with {self.trainer.world_size} processes is not supported yet: "
                "each rank would edit different requests and the replicas would drift apart. Run on one device."
            )
        self.prepare_editor()

    def prepare_editor(self) -> None:
        """Runs the editor's set-up (statistics, templates) and starts tracking its matrices; idempotent."""
        if self._editor_ready:
            return
        self.editor.setup(self.model, self.tokenizer)
        self.edit_registry.track(self.model, self.edited_parameter_names)
        self._editor_ready = True

    @property
    def edited_parameter_names(self) -> list[str]:
        return list(self.editor.parameter_names(self.model))

    @override
    def configure_optimizers(self) -> None:
        # No optimizer: the mock optimizer's step() advances global_step once per edit batch.
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
        metrics = self.apply_edit(batch)
        metrics["edit/seconds"] = time.perf_counter() - start
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        self.optimizers().step()
        if self.hparams.verbose:
            self._print_edit(batch, metrics)

    def apply_edit(self, requests: Sequence) -> dict[str, float]:
        """Computes the editor's updates for one batch, writes them and records them; returns metrics to log."""
        self.prepare_editor()
        updates = self.editor.compute_update(self.model, self.tokenizer, requests)
        unknown = [name for name in updates if name not in self.edit_registry]
        if unknown:
            raise RuntimeError(
                f"{type(self.editor).__name__} returned updates for {unknown}, which are not among its "
                f"parameter_names() {self.edited_parameter_names}"
            )
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for name, update in updates.items():
                entry = self.edit_registry[name]
                entry.record(update)
                self.edit_registry.write([name])
                metrics[f"edit/update_norm/{name}"] = _frobenius_norm(update)
        self.requests_edited += len(requests)
        metrics["edit/requests"] = float(self.requests_edited)
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

    def _quality_metrics(self, stage: str) -> tuple:
        if not hasattr(self, "_quality"):
            from prune_lightning.metrics import CounterFactScore, ZsREScore

            self._quality = {s: (CounterFactScore(), ZsREScore()) for s in ("val", "test")}
        return self._quality[stage]

    def _quality_step(self, batch: Sequence, stage: str) -> None:
        from prune_lightning.metrics.quality import update_edit_quality

        counterfact, zsre = self._quality_metrics(stage)
        update_edit_quality(counterfact, zsre, self.model, self.tokenizer, batch,
                            batch_size=self.hparams.eval_batch_size)

    def _quality_epoch_end(self, stage: str) -> None:
        metrics = {}
        for kind, metric in zip(("counterfact", "zsre"), self._quality_metrics(stage)):
            if metric.update_called:
                metrics.update({f"{stage}/{kind}/{k}": v for k, v in metric.compute().items()})
            metric.reset()
        if metrics:
            self.log_dict(metrics, sync_dist=False)

    @override
    def validation_step(self, batch: Sequence, batch_idx: int) -> None:
        """Edit quality (efficacy, generalization, locality) of the requests of this batch, on the current model."""
        self._quality_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._quality_epoch_end("val")

    @override
    def test_step(self, batch: Sequence, batch_idx: int) -> None:
        """Edit quality (efficacy, generalization, locality) of the requests of this batch, on the current model."""
        self._quality_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._quality_epoch_end("test")

    # ------------------------------------------------------------------------------------------------------------
    # checkpoint and output
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["edit_registry"] = self.edit_registry.state_dict()
        checkpoint["requests_edited"] = self.requests_edited

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "edit_registry" in checkpoint:
            self.edit_registry.load_state_dict(checkpoint["edit_registry"], model=self.model)
        self.requests_edited = int(checkpoint.get("requests_edited", 0))

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

    @rank_zero_only
    def save_edited_model(self, path: os.PathLike) -> Path:
        """Saves model and tokenizer with ``save_pretrained`` (safetensors); written to a temp dir, then renamed."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        self.print(f"Edited model saved to {path}")
        return path


def _frobenius_norm(update: Update) -> float:
    """``||update||_F``; for factors ``L R^T`` from the small Gram matrices, without forming the product."""
    if isinstance(update, LowRankUpdate):
        left, right = update.left.double(), update.right.double()
        return math.sqrt(max(float(((left.T @ left) * (right.T @ right)).sum()), 0.0))
    return float(torch.linalg.matrix_norm(update.double()))
