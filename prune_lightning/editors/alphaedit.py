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
from prune_lightning.distributed import current_split
from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.editors.nullspace import (NULLSPACE_THRESHOLD, load_or_compute_projection, moment_digest,
                                               projection_cache_path)
try:  # the statistics' public face, here until they move to the prune_lightning.stats package
    from prune_lightning.editors.stats import REFERENCE_CORPUS, second_moment, second_moments, stats_cache_path
except ImportError:  # after that move (keep only this import once it is merged)
    from prune_lightning.stats import REFERENCE_CORPUS, second_moment, second_moments, stats_cache_path
from prune_lightning.editors.value import (FACT_TOKENS, TEMPLATE_PROMPTS, ValueSettings, check_templates, compute_key,
                                           fact_representations, generate_context_templates, optimize_value,
                                           template_groups)
from prune_lightning.models import (default_cache_dir, full_weight, get_module, hidden_size, input_dim,
                                    is_sharded_model, layer_template, linear_weight_names, mlp_out_template,
                                    num_layers, output_dim, rank_one_in_layout, write_weight)

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


@dataclass
class AlphaEditTrace:
    """What AlphaEdit computed for one request of a batch (see ``AlphaEdit.last_trace``).

    Args:
        case_id: The request's ``case_id``.
        delta: The optimised change of the last edited layer's output at the subject's last token.
        target: ``z = h + delta``, the hidden state the last edited layer should emit there (float32).
        nll_init: Mean NLL of the target before the value optimisation.
        nll_final: Mean NLL of the target with ``delta`` added.
        loss_init: Total loss (NLL, KL and decay) before the optimisation.
        loss_final: Total loss with ``delta`` added.
        steps: Adam steps taken.
    """

    case_id: Union[int, str]
    delta: torch.Tensor
    target: torch.Tensor
    nll_init: float
    nll_final: float
    loss_init: float
    loss_final: float
    steps: int


@dataclass
class AlphaEditLayerTrace:
    """What AlphaEdit solved at one layer of a batch (see ``AlphaEdit.last_layers``), in ``(out, in)`` terms.

    Args:
        layer: The layer index.
        keys: ``K_1``, the batch's keys at this layer, ``(d_in, k)``, read on the weights updated so far.
        residual: ``R_l``, this layer's share of the missing residual, ``(d, k)``.
        residual_norm: Mean over the requests of ``||z - h_cur||`` before this layer's update.
        null_space_fraction: ``||P_l K_1|| / ||K_1||``: how much of the keys lies in the null space (0: no update).
    """

    layer: int
    keys: torch.Tensor
    residual: torch.Tensor
    residual_norm: float
    null_space_fraction: float


class AlphaEdit(Editor):
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
        stats_file: Precomputed ``C_l`` (safetensors or ``.npy``) instead of computing them: a path template with
            one ``{}`` for the layer index, a ``{layer: path}`` mapping, or a single path when only one layer is
            edited.
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
    ) -> None:
        layers = list(layers) if not isinstance(layers, (int, str)) else layers
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if any(isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in layers):
            raise ValueError(f"layers must hold integer layer indices >= 0, got {layers!r}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing (edited bottom to top), got {layers!r}")
        if fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
        if template_prompts not in TEMPLATE_PROMPTS:
            raise ValueError(f"template_prompts must be one of {TEMPLATE_PROMPTS}, got {template_prompts!r}")
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
        if mom2_n_samples < 1:
            raise ValueError(f"mom2_n_samples must be a positive number of documents, got {mom2_n_samples}")
        lengths = tuple((int(length), int(count)) for length, count in context_template_lengths)
        if any(length < 1 or count < 0 for length, count in lengths):
            raise ValueError(f"context_template_lengths must hold (length >= 1, count >= 0) pairs, got {lengths}")
        if context_templates is not None:
            check_templates(context_templates)
        if isinstance(stats_file, dict):
            stats_file = {int(layer): str(path) for layer, path in stats_file.items()}
            missing = [layer for layer in layers if layer not in stats_file]
            if missing:
                raise ValueError(f"stats_file names no file for layers {missing} (it has {sorted(stats_file)})")
        elif stats_file is not None:
            stats_file = str(stats_file)
            if "{}" not in stats_file and len(layers) > 1:
                raise ValueError(
                    f"stats_file {stats_file!r} is a single path, but AlphaEdit edits layers {layers}: give a "
                    "template with '{}' for the layer index, or a {layer: path} mapping"
                )
        self.value_settings = ValueSettings(
            num_grad_steps=v_num_grad_steps,
            lr=float(v_lr),
            weight_decay=float(v_weight_decay),
            clamp_norm_factor=float(clamp_norm_factor),
            kl_factor=float(kl_factor),
            early_stop_loss=float(early_stop_loss),
            site=delta_site,
        )
        self.layers = [int(layer) for layer in layers]
        self.module_template = module_template
        self.layer_module_template = layer_module_template
        self.fact_token = fact_token
        self.v_num_grad_steps = int(v_num_grad_steps)
        self.v_lr = float(v_lr)
        self.v_loss_layer = v_loss_layer
        self.v_weight_decay = float(v_weight_decay)
        self.clamp_norm_factor = float(clamp_norm_factor)
        self.kl_factor = float(kl_factor)
        self.early_stop_loss = float(early_stop_loss)
        self.nullspace_threshold = float(nullspace_threshold)
        self.l2 = float(l2)
        self.mom2_adjustment = True
        self.mom2_corpus = mom2_corpus
        self.mom2_n_samples = int(mom2_n_samples)
        self.mom2_dtype = mom2_dtype
        self.stats_file = stats_file
        self.state_dtype = state_dtype
        self.cache_projections = bool(cache_projections)
        self.context_template_lengths = lengths
        self.template_prompts = template_prompts
        self.delta_site = delta_site
        self.seed = int(seed)
        self._given_templates = context_templates
        self._ready = False
        self.context_templates: Optional[list[str]] = None
        self.context_template_groups: list[list[str]] = []
        #: ``{layer: P_l}``, the projectors onto the null spaces (``state_dtype``, on the edited matrix's device).
        self.projections: dict[int, torch.Tensor] = {}
        #: ``{layer: dim}``, the dimension of each null space (the rank of ``P_l``).
        self.null_space_dims: dict[int, int] = {}
        #: ``{layer: K_p K_p^T}``, the sum of the outer products of the keys of every batch edited so far.
        self.key_gram: dict[int, torch.Tensor] = {}
        #: How many requests' keys ``key_gram`` holds.
        self.keys_accumulated = 0
        self.last_trace: list[AlphaEditTrace] = []
        self.last_layers: list[AlphaEditLayerTrace] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------------
    # the Editor protocol
    # ------------------------------------------------------------------------------------------------------------

    def parameter_names(self, model: nn.Module) -> list[str]:
        """``module_template.format(layer) + ".weight"`` for every edited layer; unknown modules raise ``ValueError``.

        Args:
            model: The model to edit.
        """
        return linear_weight_names(model, self.module_template or mlp_out_template(model), self.layers)

    def setup(self, model: nn.Module, tokenizer) -> None:
        """Checks the modules, loads or computes every ``C_l`` and ``P_l``, builds the templates, and starts the
        accumulated keys ``K_p K_p^T`` from zero (a new run; a resumed one restores them afterwards).

        Args:
            model: The model to edit.
            tokenizer: Its tokenizer.
        """
        self.parameter_names(model)
        hidden = hidden_size(model)
        modules = {layer: get_module(model, self._module_name(model, layer)) for layer in self.layers}
        for layer, module in modules.items():
            if output_dim(module) != hidden:
                raise ValueError(
                    f"{self._module_name(model, layer)} outputs {output_dim(module)} features, but the residual "
                    f"stream has {hidden}: AlphaEdit edits matrices that write into the residual stream (MLP "
                    "out-projections)"
                )
        get_module(model, self._layer_name(model, self.layers[-1]))
        loss_layer = self._loss_layer(model)
        n_layers = num_layers(model)
        if n_layers is not None and not 0 <= loss_layer < n_layers:
            raise ValueError(f"v_loss_layer={loss_layer} is out of range for a model with {n_layers} layers")
        get_module(model, self._layer_name(model, loss_layer))

        self.projections, self.null_space_dims = {}, {}
        for layer, (moment, cache_path, provenance) in self._moments(model, tokenizer).items():
            device = modules[layer].weight.device
            projection, dim = load_or_compute_projection(
                moment.to(device), self.nullspace_threshold, cache_path=cache_path, provenance=provenance,
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
        self.reset_state(model)

        if self._given_templates is not None:
            self.context_template_groups = template_groups(self._given_templates, plain_alone=True)
        else:
            generated = generate_context_templates(model, tokenizer, self.context_template_lengths, self.seed,
                                                   prompts=self.template_prompts)
            # AlphaEdit_main.get_context_templates (MEMIT's): the plain prompt alone, the generated texts together
            self.context_template_groups = [["{}"], generated] if generated else [["{}"]]
        self.context_templates = [t for group in self.context_template_groups for t in group]
        self._ready = True

    def compute_update(self, model: nn.Module, tokenizer, requests: Sequence) -> dict[str, Update]:
        """The update of every edited matrix that writes the batch's new targets (rank ``<= len(requests)`` each),
        and the batch's keys added to ``K_p K_p^T``.

        The model's weights are the same after the call as before: intermediate layers' updates are written only
        while the layers above are computed. The accumulated keys change only when the call succeeds.

        Args:
            model: The model to edit (not modified).
            tokenizer: Its tokenizer.
            requests: ``EditRequest`` objects (``prompt``, ``subject``, ``target_new``, ``case_id`` are used).
        """
        if not self._ready:
            self.setup(model, tokenizer)
        if not requests:
            raise ValueError("compute_update needs at least one request")
        requests = list(requests)
        site = self._site(model)
        split = current_split()

        # 1. The targets z_i at the output of the last edited layer, all on the unedited model.
        loss_block = self._loss_block(model)
        values = [
            optimize_value(model, tokenizer, request, site, self.context_templates, self.value_settings,
                           fact_token=self.fact_token, loss_block=loss_block)
            for request in requests
        ]
        targets = torch.stack([value.target for value in values])  # (k, d)

        # 2. Layer by layer, each seeing the updates below it.
        modules = {layer: get_module(model, self._module_name(model, layer)) for layer in self.layers}
        originals = {layer: full_weight(module.weight).clone() for layer, module in modules.items()}
        updates: dict[str, Update] = {}
        layer_traces: list[AlphaEditLayerTrace] = []
        batch_keys: dict[int, torch.Tensor] = {}
        try:
            for j, layer in enumerate(self.layers):
                module = modules[layer]
                weight = module.weight
                keys = torch.stack([
                    compute_key(model, tokenizer, module, r, self.context_template_groups, self.fact_token)
                    for r in requests
                ], dim=1)  # K_1: (d_in, k)
                keys = split.broadcast_(keys.contiguous())  # the same keys (and so the same K_p) on every rank
                current = fact_representations(model, tokenizer, site, requests, self.fact_token, "out")
                missing = (targets.to(current.device) - current).T  # R: (d, k)
                residual = missing.double() / (len(self.layers) - j)  # R_l
                key_factor, fraction = self._solve(layer, keys)  # A^{-1} P K_1: (d_in, k)
                out_dtype = weight.dtype if torch.finfo(weight.dtype).bits > 32 else torch.float32
                left, right = rank_one_in_layout(
                    module,
                    residual.to(device=weight.device, dtype=out_dtype),
                    key_factor.to(device=weight.device, dtype=out_dtype),
                )
                updates[self._module_name(model, layer) + ".weight"] = LowRankUpdate(left, right)
                batch_keys[layer] = keys
                layer_traces.append(
                    AlphaEditLayerTrace(
                        layer=layer,
                        keys=keys.detach().float().cpu(),
                        residual=residual.float().cpu(),
                        residual_norm=float(missing.float().norm(dim=0).mean()),
                        null_space_fraction=fraction,
                    )
                )
                if j < len(self.layers) - 1:  # the layers above see this one's update
                    write_weight(weight, full_weight(weight).float() + (left @ right.T).float())
        finally:
            for layer, module in modules.items():
                write_weight(module.weight, originals[layer])

        # 3. This batch's keys join the preserved edits (AlphaEdit_main.py: cache_c += K K^T, every layer).
        for layer, keys in batch_keys.items():
            gram = self._gram(layer)
            keys = keys.to(device=gram.device, dtype=torch.float64)
            gram.add_((keys @ keys.T).to(gram.dtype))
        self.keys_accumulated += len(requests)

        self.last_trace = [
            AlphaEditTrace(case_id=request.case_id, delta=value.delta.detach().cpu(),
                           target=value.target.detach().cpu(), nll_init=value.nll_init, nll_final=value.nll,
                           loss_init=value.loss_init, loss_final=value.loss, steps=value.steps)
            for request, value in zip(requests, values)
        ]
        self.last_layers = layer_traces
        n = len(self.last_trace)
        self.last_metrics = {
            "loss": sum(t.nll_final for t in self.last_trace) / n,
            "loss_init": sum(t.nll_init for t in self.last_trace) / n,
            "v_loss": sum(t.loss_final for t in self.last_trace) / n,
            "v_steps": sum(t.steps for t in self.last_trace) / n,
            "delta_norm": sum(float(t.delta.norm()) for t in self.last_trace) / n,
            "preserved_edit_keys": float(self.keys_accumulated),
        }
        for trace in layer_traces:
            self.last_metrics[f"residual_norm/layer_{trace.layer}"] = trace.residual_norm
            self.last_metrics[f"null_space_fraction/layer_{trace.layer}"] = trace.null_space_fraction
        return updates

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

    def _solve(self, layer: int, keys: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``A^{-1} P K_1`` with ``A = P (K_p K_p^T + K_1 K_1^T) + l2 I``, in float64; and ``||P K_1|| / ||K_1||``.

        Runs where the keys are (the edited matrix's device); ``P`` and ``K_p K_p^T`` move there once, e.g. from the
        CPU where a model that is sharded later was set up.
        """
        device = keys.device
        if self.projections[layer].device != device:
            self.projections[layer] = self.projections[layer].to(device)
        projection = self.projections[layer]
        p = projection.to(torch.float64)
        keys = keys.to(device=device, dtype=torch.float64)
        gram = self._gram(layer).to(device=device, dtype=torch.float64)
        projected = p @ keys
        system = p @ (gram + keys @ keys.T) + self.l2 * torch.eye(keys.shape[0], dtype=torch.float64, device=device)
        fraction = float(projected.norm() / keys.norm()) if float(keys.norm()) > 0 else 0.0
        return torch.linalg.solve(system, projected), fraction

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

    def _moments(self, model: nn.Module, tokenizer) -> dict[int, tuple[torch.Tensor, Optional[Path], dict]]:
        """``{layer: (C_l, the projection's cache file or None, C_l's provenance)}``."""
        model_id = _model_id(model)
        names = {layer: self._module_name(model, layer) for layer in self.layers}
        given = {layer: self._stats_file(layer) for layer in self.layers}
        # The layers without a user's file: one pass of the statistics job feeds all of them.
        missing = [names[layer] for layer in self.layers if given[layer] is None]
        computed = second_moments(model, tokenizer, missing, corpus=self.mom2_corpus, n_samples=self.mom2_n_samples,
                                  dtype=self.mom2_dtype, model_id=model_id) if missing else {}
        out = {}
        for layer in self.layers:
            name = names[layer]
            if given[layer] is None:
                moment = computed[name]
                moment_path = stats_cache_path(model_id, name, self.mom2_corpus, self.mom2_n_samples,
                                               str(self.mom2_dtype))
                provenance = _file_metadata(moment_path) or {
                    "model_id": model_id, "module": name, "corpus": str(self.mom2_corpus),
                    "n_samples": str(self.mom2_n_samples), "dtype": str(self.mom2_dtype),
                }
            else:
                moment = second_moment(model, tokenizer, name, corpus=self.mom2_corpus, n_samples=self.mom2_n_samples,
                                       dtype=self.mom2_dtype, stats_file=given[layer])
                # A user's file: the projection is cached under the statistics cache, named by C's digest.
                moment_path = (default_cache_dir() / "stats" /
                               f"{model_id}__{name}__stats-file-{moment_digest(moment)[:16]}.safetensors")
                provenance = {"model_id": model_id, "module": name, "stats_file": str(given[layer])}
            cache_path = (projection_cache_path(moment_path, self.nullspace_threshold, self.state_dtype)
                          if self.cache_projections else None)
            out[layer] = (moment, cache_path, provenance)
        return out

    def _site(self, model: nn.Module) -> nn.Module:
        """The module whose output ``delta`` is added to and the residual is measured at (last edited layer)."""
        top = self.layers[-1]
        if self.delta_site == "module":
            return get_module(model, self._module_name(model, top))
        return get_module(model, self._layer_name(model, top))

    def _loss_layer(self, model: nn.Module) -> int:
        if self.v_loss_layer is not None:
            return max(int(self.v_loss_layer), self.layers[-1])  # compute_z.py: max(v_loss_layer, layer)
        n_layers = num_layers(model)
        if n_layers is None:
            raise ValueError("Cannot tell the number of layers of this model; give v_loss_layer explicitly")
        return n_layers - 1

    def _loss_block(self, model: nn.Module) -> Optional[nn.Module]:
        """The block whose output gives the target NLL, or None for the model's own logits (the last layer)."""
        loss_layer = self._loss_layer(model)
        n_layers = num_layers(model)
        if n_layers is not None and loss_layer == n_layers - 1:
            return None
        if is_sharded_model(model):
            raise NotImplementedError(
                f"AlphaEdit with v_loss_layer={loss_layer} below the last layer on a sharded (FSDP) model: the final "
                "norm and head would run outside the model's forward, on sharded weights. Use the last layer (the "
                "presets do)."
            )
        return get_module(model, self._layer_name(model, loss_layer))

    def _stats_file(self, layer: int) -> Optional[str]:
        if self.stats_file is None:
            return None
        if isinstance(self.stats_file, dict):
            return self.stats_file[layer]
        return self.stats_file.format(layer) if "{}" in self.stats_file else str(Path(self.stats_file))

    def _module_name(self, model: nn.Module, layer: int) -> str:
        return (self.module_template or mlp_out_template(model)).format(layer)

    def _layer_name(self, model: nn.Module, layer: int) -> str:
        return (self.layer_module_template or layer_template(model)).format(layer)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, fact_token={self.fact_token!r}, "
            f"v_num_grad_steps={self.v_num_grad_steps}, v_lr={self.v_lr}, "
            f"nullspace_threshold={self.nullspace_threshold:g}, l2={self.l2:g})"
        )


def _model_id(model: nn.Module) -> str:
    """The model's name in the statistics cache: the last part of ``config._name_or_path`` (the cache's own default),
    passed to the statistics explicitly so that ``C``'s cache file - and the projection's beside it - are known."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    return Path(str(name).rstrip("/")).name or type(model).__name__


def _file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (``C``'s provenance), or ``{}`` when there is no readable file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # not written (yet) on this process, or unreadable: the caller falls back to what it knows
        return {}
