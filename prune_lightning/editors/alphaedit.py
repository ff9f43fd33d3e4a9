r"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025, arXiv 2410.02355).

The idea. MEMIT (:mod:`.memit`) writes a batch of facts into the MLP out-projections of several layers and trades
the new facts off against the values of ordinary keys with a soft penalty ``lambda C``. In a long sequence of
batches that trade-off keeps costing: every batch disturbs what the model knew and what earlier batches wrote.
AlphaEdit removes the ordinary keys from the trade-off altogether. It projects each update onto the null space of the
*preserved* keys ``K_0`` (the keys a layer sees in ordinary text), so their values cannot change, and it keeps the
keys of the earlier edits ``K_p`` in the objective, so later batches disturb those less.

Targets, keys and the spread over layers are MEMIT's, from the shared :mod:`.value` module (the authors' code is
MEMIT's: ``AlphaEdit/compute_z.py`` and ``compute_ks.py`` are ``memit/compute_z.py`` and ``compute_ks.py``):
``delta_i`` is fitted at the output of the last edited block, ``z_i = h_i + delta_i``, and for ``j = 0 .. L-1``,
layer ``l = l_{j+1}``, on the weights updated so far:

- ``K_1 = [k_1 .. k_k]`` (``d_in x k``): this batch's keys at layer ``l`` (:func:`~.value.compute_key`);
- ``R_l = [z_i - h_i^cur] / (L - j)`` (``d x k``): this layer's share of the residual still missing at the top;
- the update, with ``P_l`` the projector onto the null space of ``K_0 K_0^T`` at this layer (:mod:`.nullspace`) and
  ``K_p K_p^T`` the sum over every earlier batch of its keys' ``K K^T`` at this layer::

      dW_l = R_l K_1^T P_l (K_p K_p^T P_l + K_1 K_1^T P_l + l2 * I)^{-1}                     (out x in)

  It minimises, over the updates ``X`` with ``X = X P_l`` (the projected ones, ``Delta P_l`` in the paper)::

      || X K_1 - R_l ||^2  +  || X K_p ||^2  +  l2 * || X ||^2

  (the stationarity condition ``X (K_1 K_1^T + K_p K_p^T) P_l + l2 X P_l = R_l K_1^T P_l`` holds for ``dW_l``, and
  ``dW_l = dW_l P_l``: below). Every ``dW_l`` is a value factor ``R_l`` times a key factor ``A^{-1} P_l K_1`` with
  ``A = P_l (K_p K_p^T + K_1 K_1^T) + l2 * I`` - the reference's ``torch.linalg.solve`` - done in float64, so it comes
  back as rank ``<= k`` factors, as MEMIT's do.
- ``dW_l`` is written into ``W_l`` for the moment, so the keys and hidden states of the layers above see it.

Why the preserved keys keep their values. ``A^T (I - P) = l2 (I - P)`` because ``P (I - P) = 0``, so ``A^{-T}`` maps
the complement of ``P``'s range into itself, and ``dW_l x = R_l (A^{-1} P K_1)^T x = R_l K_1^T P A^{-T} x`` vanishes
for every ``x`` with ``P x = 0``: ``dW_l = dW_l P_l``. The preserved keys' values, and so every hidden state computed
from them, stay as they were - up to the keys' components along eigenvectors of ``C`` whose eigenvalues are small
but not zero: the threshold counts those as null space, and ``P`` keeps them.

After the batch, its keys join the preserved edits: ``K_p K_p^T += K_1 K_1^T`` at every layer. The reference
(``AlphaEdit_main.py``) recomputes the keys on the edited model for that; the key of layer ``l_{j+1}`` depends only on
the layers below it, which are exactly the layers already written when it was computed in the loop, so the loop's
keys are the same and are used here. ``K_p K_p^T`` is the editor's state: :meth:`AlphaEdit.state_dict` hands it to
the checkpoint (``SequentialEditor`` saves it under ``"editor_state"``), :meth:`AlphaEdit.load_state_dict` restores
it on resume, and :meth:`AlphaEdit.setup` - called once when a fit starts - starts it from zero, so two runs never
share it. Nothing is kept at module level.

The reference's choices, kept here (``jianghoucheng/AlphaEdit``: ``AlphaEdit/AlphaEdit_main.py`` for the update and
the accumulation, ``experiments/evaluate.py`` ``get_project`` for ``P``, ``hparams/AlphaEdit/*.json``):

- ``P_l`` from the eigenvectors of ``C_l`` with eigenvalue below ``nullspace_threshold = 0.02`` (absolute, ``C`` per
  token: :mod:`.nullspace`); ``l2 = 10``; the same values for GPT-2 XL, GPT-J and LLaMA-3-8B;
- ``K_p K_p^T`` is a plain sum (not an average) of the keys' outer products, one key per request and layer, starting
  from zero at the start of a run;
- the statistics ``C_l`` are MEMIT's (Wikipedia, 100,000 documents); the hyperparameter files also carry MEMIT's
  ``mom2_update_weight``, which AlphaEdit's update does not read and which is therefore not an argument here.

Several processes. The keys of each layer are broadcast from rank 0 before they are used, so every rank accumulates
the same ``K_p K_p^T`` (the layers above the first see rank-local intermediate writes, which may differ in the last
bits); the updates themselves are broadcast by ``SequentialEditor``.

Composition. The updates are ordinary low-rank writes: ``PRUNECallback``, ``RECTCallback`` and
``ConditionNumberMonitor`` act on them unchanged. A restraint that rewrites ``W`` after a batch changes values the
projection protected; the accumulated keys are those of the edits as computed, not re-read from the restrained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from prune_lightning import distributed
from prune_lightning.editors.memit import MEMIT, MEMITLayerTrace, MEMITTrace
from prune_lightning.editors.nullspace import (NULLSPACE_THRESHOLD, load_or_compute_projection, moment_digest,
                                               projection_cache_path)
from prune_lightning.models import default_cache_dir, get_module, input_dim
from prune_lightning.stats import REFERENCE_CORPUS, stats_cache_path
from prune_lightning.stats.cache import default_model_id, read_metadata

__all__ = ["AlphaEdit", "ALPHAEDIT_PRESETS", "AlphaEditTrace", "AlphaEditLayerTrace"]

_STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# The published hyperparameters: jianghoucheng/AlphaEdit hparams/AlphaEdit/{gpt2-xl, EleutherAI_gpt-j-6B,
# Llama3-8B}.json. Their mom2_update_weight (MEMIT's lambda) is not read by AlphaEdit's update.
ALPHAEDIT_PRESETS: dict[str, dict] = {
    "gpt2-xl": dict(
        layers=[13, 14, 15, 16, 17],
        fact_token="subject_last",
        v_num_grad_steps=20,
        v_lr=0.5,
        v_loss_layer=47,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        nullspace_threshold=2e-2,
        l2=10.0,
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((10, 5),),
    ),
    "gpt-j-6b": dict(
        layers=[3, 4, 5, 6, 7, 8],
        fact_token="subject_last",
        v_num_grad_steps=25,
        v_lr=0.5,
        v_loss_layer=27,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        nullspace_threshold=2e-2,
        l2=10.0,
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((10, 5),),
    ),
    "llama3-8b": dict(
        layers=[4, 5, 6, 7, 8],
        fact_token="subject_last",
        v_num_grad_steps=25,
        v_lr=0.1,
        v_loss_layer=31,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        nullspace_threshold=2e-2,
        l2=10.0,
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((10, 5),),
    ),
}


#: What AlphaEdit computed for one request of a batch: MEMIT's trace (the targets are MEMIT's).
AlphaEditTrace = MEMITTrace


@dataclass
class AlphaEditLayerTrace(MEMITLayerTrace):
    """What AlphaEdit solved at one layer of a batch (see ``AlphaEdit.last_layers``), in ``(out, in)`` terms.

    Args:
        layer: The layer index.
        keys: ``K_1``, the batch's keys at this layer, ``(d_in, k)``, read on the weights updated so far.
        residual: ``R_l``, this layer's share of the missing residual, ``(d, k)``.
        residual_norm: Mean over the requests of ``||z - h_cur||`` before this layer's update.
        null_space_fraction: ``||P_l K_1|| / ||K_1||``: how much of the keys lies in the null space (0: no update).
    """

    null_space_fraction: float = 0.0


class AlphaEdit(MEMIT):
    """AlphaEdit: MEMIT's batch edit over several layers, projected onto the null space of the preserved keys.

    Args:
        layers: Indices of the layers whose MLP out-projections are edited, strictly increasing; the targets are
            set at the output of the last one.
        module_template: Name template of the edited modules (default by model type, e.g.
            ``transformer.h.{}.mlp.c_proj`` for GPT-2, ``model.layers.{}.mlp.down_proj`` for LLaMA).
        layer_module_template: Name template of a transformer block (default by model type, e.g.
            ``transformer.h.{}``).
        fact_token: Where keys and hidden states are read: ``"subject_last"`` or ``"last"`` (the prompt's last token).
        v_num_grad_steps: Times round the target optimisation's loop; the last one only evaluates the loss, so at
            most ``v_num_grad_steps - 1`` Adam steps (as in the authors' code).
        v_lr: Adam learning rate of the target optimisation.
        v_loss_layer: Layer whose output gives the target NLL (default: the last layer, i.e. the model's logits).
        v_weight_decay: Weight of ``||delta|| / ||h||^2`` in the target loss.
        clamp_norm_factor: ``||delta||`` is clamped to this multiple of ``||h||`` after every step.
        kl_factor: Weight of ``KL(edited || original)`` on the ``"{subject} is a"`` prompt.
        early_stop_loss: Stop a target optimisation once its total loss is below this.
        nullspace_threshold: Eigenvalues of ``C_l`` below this (absolute) span the null space ``P_l`` projects onto
            (the reference's ``nullspace_threshold``).
        l2: ``l2`` in ``(K_p K_p^T P + K_1 K_1^T P + l2 * I)``: the penalty on the update's norm (the reference's
            ``L2``).
        mom2_adjustment: Must stay ``True``: AlphaEdit's projection is built from the statistics ``C_l``. (Accepted
            so that a MEMIT config switched to AlphaEdit gets a clear error rather than an unknown argument.)
        mom2_corpus: Corpus for ``C_l``: hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` file
            (default: Wikipedia, as in the authors' code).
        mom2_n_samples: Number of corpus documents ``C_l`` is computed over.
        mom2_dtype: Accumulation dtype of ``C_l`` (``"float32"`` or ``"float64"``).
        stats_file: Precomputed ``C_l`` (safetensors, ``.npy`` or the authors' ``.npz``) instead of computing them:
            a path template with one ``{}`` for the layer index, a ``{layer: path}`` mapping, or a single path when
            only one layer is edited.
        state_dtype: dtype of ``P_l`` and of the accumulated ``K_p K_p^T``, kept on the edited matrices' device and
            in checkpoints (``"float32"``, as the reference keeps them, or ``"float64"``); the solve is float64 either
            way.
        cache_projections: Cache ``P_l`` beside ``C_l`` (see :mod:`.nullspace`); ``False`` computes it every run.
        context_templates: Explicit context templates (each with one ``{}`` where the prompt goes): a list of groups
            (lists) to average keys over, or a flat list, grouped as the authors' code groups its own: the plain
            ``"{}"`` alone, the others together. Default: ``"{}"`` and templates generated in :meth:`setup`.
        context_template_lengths: ``(length, count)`` pairs of generated templates: ``count`` texts of ``length``
            tokens in all, their opening included.
        template_prompts: How generated templates open: ``"prefixes"`` ("The", "Therefore", "Because", "I", "You";
            the authors' code) or ``"eos"`` (the end-of-text token).
        delta_site: Where ``delta`` is added: ``"block"`` (the last edited block's output, the authors' code) or
            ``"module"`` (its MLP out-projection's output).
        seed: Seed of the template generation.
        reuse_prefix: Run the layers below the one ``delta`` is added to once per request, not in every round of the
            value optimisation (they do not depend on ``delta``; the authors' code reruns them). Same result.
        logits_subset: Compute the logits only where the value loss reads them (the authors' code computes all).
            Same result.
    """

    presets = ALPHAEDIT_PRESETS

    def __init__(
        self,
        layers: Sequence[int] = (13, 14, 15, 16, 17),
        module_template: Optional[str] = None,
        layer_module_template: Optional[str] = None,
        fact_token: str = "subject_last",
        v_num_grad_steps: int = 20,
        v_lr: float = 0.5,
        v_loss_layer: Optional[int] = None,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        early_stop_loss: float = 0.05,
        nullspace_threshold: float = NULLSPACE_THRESHOLD,
        l2: float = 10.0,
        mom2_adjustment: bool = True,
        mom2_corpus: str = REFERENCE_CORPUS,
        mom2_n_samples: int = 100000,
        mom2_dtype: str = "float32",
        stats_file: Union[str, dict[int, str], None] = None,
        state_dtype: str = "float32",
        cache_projections: bool = True,
        context_templates: Union[list[str], list[list[str]], None] = None,
        context_template_lengths: tuple = ((10, 5),),
        template_prompts: str = "prefixes",
        delta_site: str = "block",
        seed: int = 0,
        reuse_prefix: bool = True,
        logits_subset: bool = True,
    ) -> None:
        if not mom2_adjustment:
            raise ValueError(
                "AlphaEdit needs the second moments C of the edited layers' keys: its null-space projection is built "
                "from them, so mom2_adjustment=False is not supported. Give a corpus (mom2_corpus) or precomputed "
                "statistics (stats_file)."
            )
        if isinstance(nullspace_threshold, bool) or not (isinstance(nullspace_threshold, (int, float))
                                                         and 0 < nullspace_threshold < math.inf):
            raise ValueError(f"nullspace_threshold must be a positive number, got {nullspace_threshold!r}")
        if isinstance(l2, bool) or not (isinstance(l2, (int, float)) and 0 < l2 < math.inf):
            raise ValueError(f"l2 must be positive (the solve needs it), got {l2!r}")
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(_STATE_DTYPES)}, got {state_dtype!r}")
        super().__init__(
            layers=layers, module_template=module_template, layer_module_template=layer_module_template,
            fact_token=fact_token, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_loss_layer=v_loss_layer,
            v_weight_decay=v_weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor,
            early_stop_loss=early_stop_loss, mom2_adjustment=True, mom2_corpus=mom2_corpus,
            mom2_n_samples=mom2_n_samples, mom2_dtype=mom2_dtype, stats_file=stats_file,
            context_templates=context_templates, context_template_lengths=context_template_lengths,
            template_prompts=template_prompts, delta_site=delta_site, seed=seed, reuse_prefix=reuse_prefix,
            logits_subset=logits_subset,
        )
        self.nullspace_threshold = float(nullspace_threshold)
        self.l2 = float(l2)
        self.state_dtype = state_dtype
        self.cache_projections = bool(cache_projections)
        #: ``{layer: P_l}``, the projectors onto the null spaces (``state_dtype``, on the edited matrix's device).
        self.projections: dict[int, torch.Tensor] = {}
        #: ``{layer: dim}``, the dimension of each null space (the rank of ``P_l``).
        self.null_space_dims: dict[int, int] = {}
        #: ``{layer: K_p K_p^T}``, the sum of the outer products of the keys of every batch edited so far.
        self.key_gram: dict[int, torch.Tensor] = {}
        #: How many requests' keys ``key_gram`` holds.
        self.keys_accumulated = 0
        self._last_batch: dict[int, torch.Tensor] = {}
        self._fractions: dict[int, float] = {}

    # ------------------------------------------------------------------------------------------------------------
    # the Editor protocol
    # ------------------------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module, tokenizer) -> None:
        """MEMIT's set-up (modules, ``C_l``, templates), then every ``P_l`` from ``C_l``, and the accumulated keys
        ``K_p K_p^T`` from zero (a new run; a resumed one restores them afterwards).

        Args:
            model: The model to edit.
            tokenizer: Its tokenizer.
        """
        super().setup(model, tokenizer)
        self.projections, self.null_space_dims = {}, {}
        for layer, (cache_path, provenance) in self._projection_sources(model).items():
            module = get_module(model, self._module_name(model, layer))
            device = module.weight.device
            projection, dim = load_or_compute_projection(
                self._mom2[layer].to(device), self.nullspace_threshold, cache_path=cache_path, provenance=provenance,
                dtype=self.state_dtype, write=distributed.rank() == 0,
            )
            self.projections[layer] = projection.to(device=device, dtype=_STATE_DTYPES[self.state_dtype])
            self.null_space_dims[layer] = dim
            if dim == 0:
                rank_zero_warn(
                    f"AlphaEdit: every eigenvalue of C at layer {layer} is >= nullspace_threshold="
                    f"{self.nullspace_threshold:g}, so its null space is empty and the updates of "
                    f"{self._module_name(model, layer)} will be zero. Raise nullspace_threshold."
                )
        self._mom2 = {}  # C is needed only for P (AlphaEdit's update does not read MEMIT's lambda C)
        self.reset_state(model)

    def discard_last_update(self) -> None:
        """The last batch's updates were not written (``on_bad_update="skip"``): its keys leave ``K_p K_p^T``."""
        for layer, keys in self._last_batch.items():
            gram = self._gram(layer)
            keys = keys.to(device=gram.device, dtype=torch.float64)
            gram.sub_((keys @ keys.T).to(gram.dtype))
        if self._last_batch:
            self.keys_accumulated -= next(iter(self._last_batch.values())).shape[1]
        self._last_batch = {}

    # ------------------------------------------------------------------------------------------------------------
    # what AlphaEdit changes in MEMIT's batch: the solve, the accumulated keys
    # ------------------------------------------------------------------------------------------------------------

    def _solve(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """``A^{-1} P K_1`` with ``A = P (K_p K_p^T + K_1 K_1^T) + l2 I``, in float64 (and ``||P K_1|| / ||K_1||`` for
        the trace).

        Runs where the keys are (the edited matrix's device); ``P`` and ``K_p K_p^T`` move there once, e.g. from the
        CPU where a model that is sharded later was set up.
        """
        device = keys.device
        if self.projections[layer].device != device:
            self.projections[layer] = self.projections[layer].to(device)
        p = self.projections[layer].to(torch.float64)
        keys = keys.to(device=device, dtype=torch.float64)
        gram = self._gram(layer).to(device=device, dtype=torch.float64)
        projected = p @ keys
        system = p @ (gram + keys @ keys.T) + self.l2 * torch.eye(keys.shape[0], dtype=torch.float64, device=device)
        self._fractions[layer] = float(projected.norm() / keys.norm()) if float(keys.norm()) > 0 else 0.0
        return torch.linalg.solve(system, projected)

    def _layer_trace(self, layer: int, keys: torch.Tensor, residual: torch.Tensor,
                     missing: torch.Tensor) -> AlphaEditLayerTrace:
        base = super()._layer_trace(layer, keys, residual, missing)
        return AlphaEditLayerTrace(**vars(base), null_space_fraction=self._fractions.get(layer, 0.0))

    def _batch_done(self, batch_keys: dict[int, torch.Tensor], requests: Sequence) -> None:
        """This batch's keys join the preserved edits (``AlphaEdit_main.py``: ``cache_c += K K^T``, every layer)."""
        for layer, keys in batch_keys.items():
            gram = self._gram(layer)
            keys = keys.to(device=gram.device, dtype=torch.float64)
            gram.add_((keys @ keys.T).to(gram.dtype))
        self.keys_accumulated += len(requests)
        self._last_batch = dict(batch_keys)

    def _extra_metrics(self, layer_traces: Sequence[MEMITLayerTrace]) -> dict[str, float]:
        metrics = {"preserved_edit_keys": float(self.keys_accumulated)}
        for trace in layer_traces:
            metrics[f"null_space_fraction/layer_{trace.layer}"] = getattr(trace, "null_space_fraction", 0.0)
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # editor state: the accumulated keys K_p K_p^T
    # ------------------------------------------------------------------------------------------------------------

    def reset_state(self, model: Optional[nn.Module] = None) -> None:
        """Forgets the earlier edits: ``K_p K_p^T`` starts from zero (what :meth:`setup` does at the start of a run).

        Args:
            model: The edited model, to allocate the sums on its matrices' devices; without it they are allocated on
                first use.
        """
        self.key_gram = {}
        self.keys_accumulated = 0
        self._last_batch = {}
        if model is not None:
            for layer in self.layers:
                module = get_module(model, self._module_name(model, layer))
                dim = input_dim(module)
                self.key_gram[layer] = torch.zeros(dim, dim, dtype=_STATE_DTYPES[self.state_dtype],
                                                   device=module.weight.device)

    def state_dict(self) -> dict[str, Any]:
        """``K_p K_p^T`` per layer (CPU copies) and the number of keys in it, for the checkpoint."""
        return {
            "layers": list(self.layers),
            "keys_accumulated": int(self.keys_accumulated),
            "key_gram": {int(layer): gram.detach().cpu().clone() for layer, gram in self.key_gram.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (on resume, after :meth:`setup`).

        Args:
            state: A dict from :meth:`state_dict`.
        """
        layers = [int(layer) for layer in state.get("layers", [])]
        if layers != self.layers:
            raise ValueError(
                f"The checkpoint's AlphaEdit state is for layers {layers}, but this editor edits {self.layers}"
            )
        grams = {int(layer): gram for layer, gram in state["key_gram"].items()}
        restored: dict[int, torch.Tensor] = {}
        for layer, gram in grams.items():
            current = self.key_gram.get(layer)
            if current is not None and tuple(current.shape) != tuple(gram.shape):
                raise ValueError(
                    f"The checkpoint's K_p K_p^T of layer {layer} has shape {tuple(gram.shape)}, but the edited "
                    f"matrix takes keys of dimension {current.shape[0]}"
                )
            device = current.device if current is not None else gram.device
            restored[layer] = gram.to(device=device, dtype=_STATE_DTYPES[self.state_dtype]).clone()
        self.key_gram = restored
        self.keys_accumulated = int(state.get("keys_accumulated", 0))

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _gram(self, layer: int) -> torch.Tensor:
        """``K_p K_p^T`` of a layer, on ``P_l``'s device and in ``state_dtype`` (allocated on first use)."""
        projection = self.projections[layer]
        gram = self.key_gram.get(layer)
        if gram is None:
            gram = torch.zeros_like(projection, dtype=_STATE_DTYPES[self.state_dtype])
        elif gram.device != projection.device or gram.dtype != _STATE_DTYPES[self.state_dtype]:
            gram = gram.to(device=projection.device, dtype=_STATE_DTYPES[self.state_dtype])
        self.key_gram[layer] = gram
        return gram

    def _projection_sources(self, model: nn.Module) -> dict[int, tuple[Optional[Path], dict]]:
        """``{layer: (the projection's cache file or None, C_l's provenance)}``: beside ``C_l``'s cache file."""
        model_id = default_model_id(model)
        out = {}
        for layer in self.layers:
            name = self._module_name(model, layer)
            given = self._stats_file(layer)
            moment = self._mom2[layer]
            if given is None:
                moment_path = stats_cache_path(model_id, name, self.mom2_corpus, self.mom2_n_samples,
                                               str(self.mom2_dtype))
                provenance = read_metadata(moment_path) or {
                    "model_id": model_id, "module": name, "corpus": str(self.mom2_corpus),
                    "n_samples": str(self.mom2_n_samples), "dtype": str(self.mom2_dtype),
                }
            else:
                # A user's file: the projection is cached under the statistics cache, named by C's digest.
                moment_path = (default_cache_dir() / "stats" /
                               f"{model_id}__{name}__stats-file-{moment_digest(moment)[:16]}.safetensors")
                provenance = {"model_id": model_id, "module": name, "stats_file": str(given)}
            cache_path = (projection_cache_path(moment_path, self.nullspace_threshold, self.state_dtype)
                          if self.cache_projections else None)
            out[layer] = (cache_path, provenance)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, fact_token={self.fact_token!r}, "
            f"v_num_grad_steps={self.v_num_grad_steps}, v_lr={self.v_lr}, "
            f"nullspace_threshold={self.nullspace_threshold:g}, l2={self.l2:g})"
        )
