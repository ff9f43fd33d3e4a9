r"""``MENDTrainer``: training MEND's hypernetwork as a Lightning fit.

One training step is one edit (``batch_size`` requests at once), as in the references' ``EditTrainer.edit_step``
(``eric-mitchell/mend`` ``trainer.py``; EasyEdit ``trainer/EditTrainer.py``):

1. *Inner step.* The edit loss of the new target on the unedited model gives the gradient factors of every edited
   matrix (:func:`~prune_lightning.mend.gradients.capture_factors`); the hypernetwork turns them into updates
   ``dW_l(phi)`` (in training mode it first adds the rows to its normalisation statistics).
2. *Outer losses*, on the model edited by ``dW(phi)``:

   - ``L_edit``: the target's mean token NLL on the edit prompt (EasyEdit) or a paraphrase (MEND's ``edit_outer``);
   - ``L_loc``: ``KL(p_before || p_after)`` on an unrelated prompt, at the positions that predict its answer;

   ``L = cedit * L_edit + cloc * L_loc`` (published: ``cedit = 0.1``, ``cloc = 1.0``), back-propagated into the
   hypernetwork's parameters and step sizes only - the model is frozen and stays in eval mode.
3. Adam, with gradients accumulated over ``accumulate_grad_batches`` edits (published: 10) and clipped to a total norm
   of ``gradient_clip_val`` (100): Trainer settings (``configs/*/mend-train.yaml``). The MLPs and the step sizes
   ``edit_lrs`` learn at ``lr`` (1e-6). The references configure a second Adam for the step sizes (``lr_lr``,
   1e-4), but step it only after the main Adam's ``zero_grad()`` has cleared the step sizes' gradients (to ``None``
   since torch 2, so it skips them; to zeros before, so its moments stay 0 and its step is 0): it never moves them,
   and their step sizes learn at ``lr`` alone (measured against both). ``lr_lr`` here is an extra rate of the step
   sizes on top of ``lr``, 0 by default as in effect there.

Validation edits each validation request on its own, from the unedited model, and logs means over the requests:
``val/loss_edit``, ``val/loss_loc``, ``val/loss_total_edit`` (the GPT-2 reference's early-stopping key),
``val/edit_token_acc`` (teacher-forced top-1 accuracy of the target's tokens after the edit; EasyEdit's ``edit/acc``),
``val/loc_token_acc_pre`` / ``_post`` and ``val/drawdown`` (their difference: what the edit cost on the locality
prompt), and the edit-quality scores of the edited model - ``val/counterfact/efficacy`` (new target beats the true
one, by mean token NLL), ``generalization``, ``locality`` (and margins), or ``val/zsre/*`` for zsRE requests.

The result: whenever the ``monitor``-ed validation score improves (``val/loss_total_edit`` by default, lower is
better, as the GPT-2 reference's early stopping; EasyEdit's LLaMA settings monitor ``val/edit_token_acc``), the
hypernetwork is written to ``hypernetwork_file`` (default ``<log dir>/hypernetwork.safetensors``), which
``MEND(hypernetwork=PATH)`` loads; without validation, at the end of the fit. Lightning checkpoints hold the
hypernetwork, its optimizer state and the position in the training stream, not the model's weights; a fit resumed
from one ends with the hypernetwork of an uninterrupted fit.

One process: the normalisation statistics are updated step by step on one copy; multi-process training is refused.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from prune_lightning.mend.data import MENDSample
from prune_lightning.mend.gradients import (adding_updates, capture_factors, default_layers, kl_locality,
                                            matrix_shapes, mend_parameter_names, target_log_probs,
                                            teacher_forced_batch, token_accuracy, token_nll)
from prune_lightning.mend.hypernet import MENDHypernetwork, save_hypernetwork
from prune_lightning.models import get_module, load_causal_lm, load_tokenizer

__all__ = ["MENDTrainer"]

warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

_MONITOR_MODES = ("min", "max")


class MENDTrainer(LightningModule):
    """Trains a MEND hypernetwork for one model's edited matrices.

    Args:
        model: Hugging Face hub id, local ``save_pretrained`` directory or ``tiny:gpt2`` / ``tiny:llama``.
        layers: Layers whose matrices are edited (default: the last three, as in the references).
        module_templates: Name templates of the edited modules in a layer (default by model type: GPT-2 ``c_proj``,
            ``c_fc``; LLaMA ``gate_proj``, ``up_proj``, ``down_proj``).
        tokenizer: Tokenizer id or path, if it differs from ``model``.
        dtype: Parameter dtype of the model (the hypernetwork is float32).
        n_hidden: Hidden layers of each MLP of the hypernetwork.
        rank: Inner width of its low-rank layers (1920).
        init: ``"id"`` (identity at start) or ``"xavier"``.
        norm: Standardise the factors with running statistics.
        combine: One MLP over ``[u; delta]``.
        one_sided: Without ``combine``: transform only the smaller factor.
        x_only: Without ``combine``: transform only ``u``.
        delta_only: Without ``combine``: transform only ``delta``.
        shared: One transform per matrix shape, with per-matrix scale and shift.
        edit_lr: Initial step size of every matrix (1e-4).
        lr: Adam learning rate of the hypernetwork's MLPs (1e-6).
        lr_lr: Extra Adam learning rate of the step sizes: they learn at ``lr + lr_lr``. Default 0, which is what
            the references' ``lr_lr`` (1e-4) amounts to: their optimizer for it never steps (see above).
        cedit: Weight of the edit loss (0.1).
        cloc: Weight of the locality loss (1.0).
        hypernetwork_file: Where the trained hypernetwork is written (default ``<log dir>/hypernetwork.safetensors``).
        monitor: The validation score that decides which hypernetwork is written.
        monitor_mode: ``"min"`` or ``"max"``: whether lower or higher ``monitor`` is better.
        seed: Seeds the hypernetwork's initialisation.
        eval_batch_size: Prompts per forward pass of the validation's edit-quality scores.
    """

    def __init__(
        self,
        model: str = "tiny:gpt2",
        layers: Optional[list[int]] = None,
        module_templates: Optional[list[str]] = None,
        tokenizer: Optional[str] = None,
        dtype: str = "float32",
        n_hidden: int = 1,
        rank: int = 1920,
        init: str = "id",
        norm: bool = True,
        combine: bool = True,
        one_sided: bool = False,
        x_only: bool = False,
        delta_only: bool = False,
        shared: bool = True,
        edit_lr: float = 1e-4,
        lr: float = 1e-6,
        lr_lr: float = 0.0,
        cedit: float = 0.1,
        cloc: float = 1.0,
        hypernetwork_file: Optional[str] = None,
        monitor: str = "val/loss_total_edit",
        monitor_mode: str = "min",
        seed: int = 0,
        eval_batch_size: int = 16,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("lr_lr", lr_lr), ("cedit", cedit), ("cloc", cloc)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if cedit == 0 and cloc == 0:
            raise ValueError("cedit and cloc are both 0: there would be nothing to train on")
        if monitor_mode not in _MONITOR_MODES:
            raise ValueError(f"monitor_mode must be one of {_MONITOR_MODES}, got {monitor_mode!r}")
        if layers is not None and (not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                                     for x in layers)):
            raise ValueError(f"layers must be None or a non-empty list of layer indices >= 0, got {layers!r}")
        self.save_hyperparameters()
        self.model = load_causal_lm(model, dtype=dtype)
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.layers = list(layers) if layers is not None else default_layers(self.model)
        self.parameter_names = mend_parameter_names(self.model, self.layers, module_templates)
        self.module_templates = (list(module_templates) if module_templates is not None
                                 else _templates(self.parameter_names, self.layers))
        self.hypernetwork = MENDHypernetwork(
            matrix_shapes(self.model, self.parameter_names), n_hidden=n_hidden, rank=rank, init=init, norm=norm,
            combine=combine, one_sided=one_sided, x_only=x_only, delta_only=delta_only, shared=shared,
            edit_lr=edit_lr, seed=seed)
        self._edited = {name: get_module(self.model, name.rsplit(".", 1)[0]) for name in self.parameter_names}
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.exported: Optional[Path] = None
        self._val_sums: dict[str, float] = {}
        self._val_count = 0
        self.strict_loading = False  # checkpoints leave the model's weights out

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            raise NotImplementedError(
                "MENDTrainer trains in one process: the hypernetwork's normalisation statistics are updated step by "
                f"step on one copy. Got {self.trainer.world_size} processes; use devices=1.")

    @override
    def train(self, mode: bool = True) -> "MENDTrainer":
        super().train(mode)
        self.model.eval()  # the edited model never drops out; only the hypernetwork's statistics follow the mode
        return self

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        mlp = list(self.hypernetwork.transforms.parameters())
        return torch.optim.Adam([
            {"params": mlp, "lr": self.hparams.lr},
            {"params": [self.hypernetwork.edit_lrs], "lr": self.hparams.lr + self.hparams.lr_lr},
        ])

    # ------------------------------------------------------------------------------------------------------------
    # the edit step
    # ------------------------------------------------------------------------------------------------------------

    def edit_step(self, samples: Sequence[MENDSample], scores: bool = False) -> dict[str, torch.Tensor]:
        """Edits the batch's requests through the hypernetwork and returns the losses (differentiable in the
        hypernetwork) and metrics. With ``scores``, also feeds the edit-quality metrics of the validation."""
        requests = [s.request for s in samples]
        device = self.device
        edit = teacher_forced_batch(self.tokenizer, [r.rendered_prompt for r in requests],
                                    [r.target_new for r in requests], device)
        outer = teacher_forced_batch(self.tokenizer, [s.edit_prompt for s in samples]
                                     + [s.loc_prompt for s in samples],
                                     [r.target_new for r in requests] + [s.loc_target for s in samples], device)
        loc = teacher_forced_batch(self.tokenizer, [s.loc_prompt for s in samples], [s.loc_target for s in samples],
                                   device)
        k = len(samples)
        loss_inner, factors = capture_factors(self.model, self._edited,
                                              lambda: token_nll(target_log_probs(self.model, edit), edit))
        with torch.no_grad():
            loc_before = target_log_probs(self.model, loc)
        rows = self.hypernetwork(factors)
        with adding_updates(self._edited, rows):
            after = target_log_probs(self.model, outer)
            if scores:
                with torch.no_grad():
                    self._score(requests)
        edit_rows = _rows(outer, 0, k)
        after_edit, after_loc = after[:k], after[k:, : loc.mask.shape[1]]
        loss_edit = token_nll(after_edit, edit_rows)
        loss_loc = kl_locality(loc_before, after_loc, loc)
        total = self.hparams.cedit * loss_edit + self.hparams.cloc * loss_loc
        with torch.no_grad():
            acc_pre, acc_post = token_accuracy(loc_before, loc), token_accuracy(after_loc, loc)
            return {
                "loss_total_edit": total,
                "loss_edit": loss_edit,
                "loss_loc": loss_loc,
                "loss_inner": loss_inner,
                "edit_token_acc": token_accuracy(after_edit, edit_rows),
                "loc_token_acc_pre": acc_pre,
                "loc_token_acc_post": acc_post,
                "drawdown": acc_pre - acc_post,
                "factor_rows": torch.tensor(sum(keys.shape[0] for _, keys in rows.values()) / len(rows)),
            }

    @override
    def training_step(self, batch: Sequence[MENDSample], batch_idx: int) -> Optional[torch.Tensor]:
        out = self.edit_step(batch)
        total = out["loss_total_edit"]
        metrics = {f"train/{key}": value.detach() for key, value in out.items()}
        for name, lr in zip(self.parameter_names, self.hypernetwork.edit_lrs.detach()):
            metrics[f"train/edit_lr/{name.removesuffix('.weight')}"] = lr
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        if not torch.isfinite(total):  # the references skip a step whose gradients are not finite (safe_backward)
            return None
        return total

    # ------------------------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------------------------

    def _quality(self) -> tuple:
        if not hasattr(self, "_quality_metrics"):
            from prune_lightning.metrics import CounterFactScore, ZsREScore

            self._quality_metrics = (CounterFactScore(), ZsREScore())
        self._quality_metrics = tuple(m.to(self.device) for m in self._quality_metrics)
        return self._quality_metrics

    def _score(self, requests: Sequence) -> None:
        from prune_lightning.metrics.quality import update_edit_quality

        update_edit_quality(*self._quality(), self.model, self.tokenizer, requests,
                            batch_size=self.hparams.eval_batch_size)

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_count = {}, 0
        for metric in self._quality():
            metric.reset()

    @override
    def validation_step(self, batch: Sequence[MENDSample], batch_idx: int) -> None:
        # Validation runs under inference mode by default; the edit itself needs a backward pass.
        with torch.inference_mode(False), torch.enable_grad():
            out = self.edit_step(batch, scores=True)
        for key, value in out.items():
            self._val_sums[key] = self._val_sums.get(key, 0.0) + float(value) * len(batch)
        self._val_count += len(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        if not self._val_count:
            return
        metrics = {f"val/{key}": total / self._val_count for key, total in self._val_sums.items()}
        for kind, metric in zip(("counterfact", "zsre"), self._quality()):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*compute.* was called before the .*update.*")
                values = metric.compute()
            if not torch.isnan(values["efficacy"]):
                metrics.update({f"val/{kind}/{key}": float(value) for key, value in values.items()})
        self.log_dict(metrics)
        self.last_validation = metrics
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        score = metrics.get(self.hparams.monitor)
        if score is None:
            raise ValueError(f"MENDTrainer: monitor {self.hparams.monitor!r} is not among the validation scores "
                             f"{sorted(metrics)}")
        better = self.best_score is None or (score < self.best_score if self.hparams.monitor_mode == "min"
                                             else score > self.best_score)
        if better:
            self.best_score, self.best_step = float(score), int(self.global_step)
            self.export(score=float(score))

    # ------------------------------------------------------------------------------------------------------------
    # the result
    # ------------------------------------------------------------------------------------------------------------

    @property
    def hypernetwork_path(self) -> Path:
        if self.hparams.hypernetwork_file:
            return Path(self.hparams.hypernetwork_file)
        run_dir = self.trainer.log_dir if self._trainer is not None and self.trainer.log_dir else (
            self.trainer.default_root_dir if self._trainer is not None else ".")
        return Path(run_dir) / "hypernetwork.safetensors"

    def export(self, path: Optional[str] = None, **info: Any) -> Path:
        """Writes the hypernetwork (with the model, layers and modules it was trained for) to ``path`` (default
        :attr:`hypernetwork_path`)."""
        target = Path(path) if path is not None else self.hypernetwork_path
        self.exported = save_hypernetwork(self.hypernetwork, target, **self.describe(), **info)
        return self.exported

    def describe(self) -> dict[str, Any]:
        """What a hypernetwork file records about its training."""
        return {"model": str(self.hparams.model), "layers": self.layers, "module_templates": self.module_templates,
                "step": int(self.global_step) if self._trainer is not None else 0,
                "monitor": self.hparams.monitor,
                "trained_with": {key: self.hparams[key] for key in ("lr", "lr_lr", "cedit", "cloc", "edit_lr")}}

    @override
    def on_train_end(self) -> None:
        if self.exported is None:  # no validation ran: the last hypernetwork is the result
            self.export()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if key.startswith("model.")]:
            del state[key]  # the model is not trained: its weights stay where they were loaded from
        checkpoint["mend"] = {"config": self.hypernetwork.config(), "info": self.describe(),
                              "best_score": self.best_score, "best_step": self.best_step}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("mend", {}).get("config")
        if saved is not None and saved != self.hypernetwork.config():
            differ = sorted(key for key in set(saved) | set(self.hypernetwork.config())
                            if saved.get(key) != self.hypernetwork.config().get(key))
            raise ValueError(f"Cannot resume MEND training: the checkpoint's hypernetwork differs in {differ}")
        self.best_score = checkpoint.get("mend", {}).get("best_score")
        self.best_step = checkpoint.get("mend", {}).get("best_step")


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a :class:`~prune_lightning.mend.gradients.TokenBatch`."""
    return type(batch)(batch.input_ids[start:stop], batch.attention_mask[start:stop], batch.positions[start:stop],
                       batch.targets[start:stop], batch.mask[start:stop])


def _templates(parameter_names: Sequence[str], layers: Sequence[int]) -> list[str]:
    """The module templates behind ``parameter_names`` (layer by layer, the same templates in each)."""
    per_layer = len(parameter_names) // len(layers)
    first = parameter_names[:per_layer]
    return [name.rsplit(".", 1)[0].replace(f".{layers[0]}.", ".{}.", 1) for name in first]
