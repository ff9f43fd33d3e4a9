r"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

The idea. ROME writes one fact into one MLP out-projection. MEMIT writes a whole batch of ``k`` facts at once and
spreads each of them over a *range* of consecutive layers ``l_1 < ... < l_L`` (GPT-2 XL: 13-17), so no single matrix
has to carry a large change. Each out-projection ``W_l`` is again read as a linear key-value memory: the input of
``W_l`` at the subject's last token is a key, ``W_l k`` is the value added to the residual stream.

1. Targets (:func:`~.value.optimize_value`). For every request ``i`` MEMIT finds the hidden state ``z_i`` the *last*
   edited layer should emit at the subject's last token for the model to say the new object: ``delta_i`` is added to
   the output of block ``l_L`` and fitted with the loss of :mod:`.value`, clamped to
   ``clamp_norm_factor * ||h_i||``, and ``z_i = h_i + delta_i`` with ``h_i`` the block's original output there. All
   targets are computed before any weight changes.

2. Layer by layer, bottom to top. For ``j = 0 .. L-1`` and layer ``l = l_{j+1}``, on the weights as updated so far:

   - keys ``K = [k_1 .. k_k]`` (``d_in x k``): the input of ``W_l`` at each subject's last token, averaged within
     each group of context templates and then over the groups (:func:`~.value.compute_key`);
   - the residual still missing at the top, ``R = [z_i - h_i^cur]`` (``d x k``), where ``h_i^cur`` is the current
     output of block ``l_L`` at the subject's last token of the plain prompt;
   - this layer's share of it, ``R_l = R / (L - j)`` (the remaining layers take the rest; the last one all that is
     left);
   - the update that makes ``W_l`` output ``R_l`` more at the new keys while disturbing the values of the keys seen
     in ordinary text as little as possible::

         minimise   sum_i || dW k_i - R_l[:, i] ||^2  +  lambda * E_k || dW k ||^2
         =>         dW_l (lambda C_l + K K^T) = R_l K^T
         =>         dW_l = R_l [ (lambda C_l + K K^T)^{-1} K ]^T                        (out x in)

     with ``C_l = E[k k^T]`` the per-token second moment of the keys of ``W_l`` over a text corpus
     (:func:`~prune_lightning.stats.second_moment`) and ``lambda = mom2_update_weight``. The solve is done in
     float64. ``dW_l`` is a value factor ``R_l`` (``d x k``) times a key factor ``(lambda C + K K^T)^{-1} K``
     (``d_in x k``): rank ``<= k``.
   - ``dW_l`` is written into ``W_l`` for the moment, so the keys and hidden states of the layers above see it.

   With ``mom2_adjustment=False``, ``C_l`` is the identity.

Conventions, as in the authors' code (``kmeng01/memit``: ``memit/compute_z.py`` for the targets,
``memit/compute_ks.py`` for the grouped key average, ``memit/memit_main.py`` for the templates - the plain prompt as
one group, five generated texts of 10 tokens as the other - and the layer loop); the shared ones are listed in
:mod:`.value`. ``delta_site="module"`` (off by default) adds ``delta`` to the last edited MLP's output instead of the
block's, as ROME does. For LLaMA the PRUNE paper used EasyEdit's MEMIT, whose value step is the same.

:meth:`MEMIT.compute_update` restores every weight before it returns and hands back one
:class:`~prune_lightning.editors.base.LowRankUpdate` per edited matrix, in the parameter's own layout (GPT-2's
``Conv1D`` stores ``(in, out)``); :class:`~prune_lightning.SequentialEditor` writes them.

Hyperparameters default to the paper's GPT-2 XL setting; :data:`MEMIT_PRESETS` and :meth:`MEMIT.preset` hold the
published ones per model (MEMIT's GPT-2 XL setting, EasyEdit's LLaMA settings used by the PRUNE paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.editors.base import LowRankUpdate, Update
from prune_lightning.editors.templates import (FACT_TOKENS, TEMPLATE_PROMPTS, TemplatedEditor, check_templates,
                                               generate_context_templates, template_groups)
from prune_lightning.distributed import current_split
from prune_lightning.editors.value import ValueSettings, compute_key, fact_representations, optimize_value
from prune_lightning.models import (full_weight, get_module, hidden_size, is_sharded_model, layer_template,
                                    linear_weight_names, mlp_out_template, num_layers, output_dim,
                                    rank_one_in_layout, write_weight)
from prune_lightning.stats import REFERENCE_CORPUS, second_moment, second_moments

__all__ = ["MEMIT", "MEMIT_PRESETS", "MEMITTrace", "MEMITLayerTrace"]

# The published hyperparameters: MEMIT's GPT-2 XL setting (kmeng01/memit hparams/MEMIT/gpt2-xl.json); EasyEdit's
# LLaMA setting (hparams/MEMIT/llama-7b.yaml), which the PRUNE paper used.
MEMIT_PRESETS: dict[str, dict] = {
    "gpt2-xl": dict(
        layers=[13, 14, 15, 16, 17],
        fact_token="subject_last",
        v_num_grad_steps=20,
        v_lr=0.5,
        v_loss_layer=47,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
        mom2_adjustment=True,
        mom2_update_weight=20000.0,
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((10, 5),),
    ),
    "llama2-7b": dict(
        layers=[4, 5, 6, 7, 8],
        fact_token="subject_last",
        v_num_grad_steps=25,
        v_lr=0.5,
        v_loss_layer=31,
        v_weight_decay=1e-3,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
        mom2_adjustment=True,
        mom2_update_weight=15000.0,
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((10, 5),),
    ),
}
# LLaMA-3-8B uses the LLaMA-2-7B hyperparameters (PRUNE, appendix).
MEMIT_PRESETS["llama3-8b"] = dict(MEMIT_PRESETS["llama2-7b"])


@dataclass
class MEMITTrace:
    """What MEMIT computed for one request of a batch (see ``MEMIT.last_trace``).

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
class MEMITLayerTrace:
    """What MEMIT solved at one layer of a batch (see ``MEMIT.last_layers``), in ``(out, in)`` terms.

    Args:
        layer: The layer index.
        keys: ``K``, the keys of the requests at this layer, ``(d_in, k)``, read on the weights updated so far.
        residual: ``R_l``, this layer's share of the missing residual, ``(d, k)``.
        residual_norm: Mean over the requests of ``||z - h_cur||`` before this layer's update.
    """

    layer: int
    keys: torch.Tensor
    residual: torch.Tensor
    residual_norm: float


class MEMIT(TemplatedEditor):
    """Mass-Editing Memory in a Transformer: one batch of facts spread over several MLP out-projections.

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
        mom2_adjustment: Weigh the update by the keys' second moment ``C_l`` (False: ``C_l`` is the identity).
        mom2_update_weight: ``lambda`` in ``(lambda C_l + K K^T)``: how strongly the values of ordinary keys are kept.
        mom2_corpus: Corpus for ``C_l``: hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` file
            (default: Wikipedia, as in the authors' code).
        mom2_n_samples: Number of corpus documents ``C_l`` is computed over.
        mom2_dtype: Accumulation dtype of ``C_l`` (``"float32"`` or ``"float64"``).
        stats_file: Precomputed ``C_l`` (safetensors, ``.npy`` or the authors' ``.npz``) instead of computing them:
            a path template with one ``{}`` for the layer index (``"stats/layer{}.safetensors"``), a ``{layer: path}``
            mapping, or a single path when only one layer is edited.
        context_templates: Explicit context templates (each with one ``{}`` where the prompt goes): a list of groups
            (lists) to average keys over, or a flat list, which is grouped as the authors' code groups its own: the
            plain ``"{}"`` alone, the others together. The first template is where ``h`` is read. Default: ``"{}"``
            and templates generated from the model in :meth:`setup`.
        context_template_lengths: ``(length, count)`` pairs of generated templates: ``count`` texts of ``length``
            tokens in all, their opening included.
        template_prompts: How generated templates open: ``"prefixes"`` ("The", "Therefore", "Because", "I", "You";
            MEMIT's code) or ``"eos"`` (the end-of-text token).
        delta_site: Where ``delta`` is added: ``"block"`` (the last edited block's output, the authors' code) or
            ``"module"`` (its MLP out-projection's output).
        seed: Seed of the template generation.
        reuse_prefix: Run the layers below the one ``delta`` is added to once per request, not in every round of the
            value optimisation (they do not depend on ``delta``; the authors' code reruns them). Same result.
        logits_subset: Compute the logits only where the value loss reads them (the authors' code computes all).
            Same result.
    """

    presets = MEMIT_PRESETS

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
        mom2_adjustment: bool = True,
        mom2_update_weight: float = 20000.0,
        mom2_corpus: str = REFERENCE_CORPUS,
        mom2_n_samples: int = 100000,
        mom2_dtype: str = "float32",
        stats_file: Union[str, dict[int, str], None] = None,
        context_templates: Union[list[str], list[list[str]], None] = None,
        context_template_lengths: tuple = ((10, 5),),
        template_prompts: str = "prefixes",
        delta_site: str = "block",
        seed: int = 0,
        reuse_prefix: bool = True,
        logits_subset: bool = True,
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
        if not mom2_update_weight > 0:
            raise ValueError(f"mom2_update_weight must be positive, got {mom2_update_weight}")
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
                    f"stats_file {stats_file!r} is a single path, but MEMIT edits layers {layers}: give a template "
                    "with '{}' for the layer index, or a {layer: path} mapping"
                )
        self.value_settings = ValueSettings(
            num_grad_steps=v_num_grad_steps,
            lr=float(v_lr),
            weight_decay=float(v_weight_decay),
            clamp_norm_factor=float(clamp_norm_factor),
            kl_factor=float(kl_factor),
            early_stop_loss=float(early_stop_loss),
            site=delta_site,
            reuse_prefix=bool(reuse_prefix),
            logits_subset=bool(logits_subset),
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
        self.mom2_adjustment = bool(mom2_adjustment)
        self.mom2_update_weight = float(mom2_update_weight)
        self.mom2_corpus = mom2_corpus
        self.mom2_n_samples = int(mom2_n_samples)
        self.mom2_dtype = mom2_dtype
        self.stats_file = stats_file
        self.context_template_lengths = lengths
        self.template_prompts = template_prompts
        self.delta_site = delta_site
        self.seed = int(seed)
        self.reuse_prefix = bool(reuse_prefix)
        self.logits_subset = bool(logits_subset)
        self._given_templates = context_templates
        self._ready = False
        self.context_templates: Optional[list[str]] = None
        self.context_template_groups: list[list[str]] = []
        self._mom2: dict[int, torch.Tensor] = {}
        self.last_trace: list[MEMITTrace] = []
        self.last_layers: list[MEMITLayerTrace] = []
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
        """Checks the modules, loads or computes every ``C_l`` and builds the context templates.

        Args:
            model: The model to edit.
            tokenizer: Its tokenizer.
        """
        self.parameter_names(model)
        hidden = hidden_size(model)
        for layer in self.layers:
            module = get_module(model, self._module_name(model, layer))
            if output_dim(module) != hidden:
                raise ValueError(
                    f"{self._module_name(model, layer)} outputs {output_dim(module)} features, but the residual "
                    f"stream has {hidden}: MEMIT edits matrices that write into the residual stream (MLP "
                    "out-projections)"
                )
        get_module(model, self._layer_name(model, self.layers[-1]))
        loss_layer = self._loss_layer(model)
        n_layers = num_layers(model)
        if n_layers is not None and not 0 <= loss_layer < n_layers:
            raise ValueError(f"v_loss_layer={loss_layer} is out of range for a model with {n_layers} layers")
        get_module(model, self._layer_name(model, loss_layer))
        self._mom2 = {}
        if self.mom2_adjustment:
            names = {layer: self._module_name(model, layer) for layer in self.layers}
            given = {layer: self._stats_file(layer) for layer in self.layers}
            # The layers without a user's file: one pass of the statistics job feeds all of them.
            missing = [names[layer] for layer in self.layers if given[layer] is None]
            computed = second_moments(model, tokenizer, missing, corpus=self.mom2_corpus,
                                      n_samples=self.mom2_n_samples, dtype=self.mom2_dtype) if missing else {}
            for layer in self.layers:
                moment = computed.get(names[layer])
                if moment is None:
                    moment = second_moment(model, tokenizer, names[layer], corpus=self.mom2_corpus,
                                           n_samples=self.mom2_n_samples, dtype=self.mom2_dtype,
                                           stats_file=given[layer])
                self._mom2[layer] = moment.to(get_module(model, names[layer]).weight.device)
        if self._given_templates is not None:
            self.context_template_groups = template_groups(self._given_templates, plain_alone=True)
        else:
            generated = generate_context_templates(model, tokenizer, self.context_template_lengths, self.seed,
                                                   prompts=self.template_prompts)
            # memit_main.get_context_templates: the plain prompt alone, the generated texts together
            self.context_template_groups = [["{}"], generated] if generated else [["{}"]]
        self.context_templates = [t for group in self.context_template_groups for t in group]
        self._ready = True

    def compute_update(self, model: nn.Module, tokenizer, requests: Sequence) -> dict[str, Update]:
        """The update of every edited matrix that writes the batch's new targets (rank ``<= len(requests)`` each).

        The model's weights are the same after the call as before: intermediate layers' updates are written only
        while the layers above are computed.

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

        # 1. The targets z_i at the output of the last edited layer, all on the unedited model.
        loss_block = self._loss_block(model)
        prefix = [get_module(model, self._layer_name(model, i)) for i in range(self.layers[-1])]  # do not see delta
        values = [
            optimize_value(model, tokenizer, request, site, self.context_templates, self.value_settings,
                           fact_token=self.fact_token, loss_block=loss_block, prefix=prefix)
            for request in requests
        ]
        targets = torch.stack([value.target for value in values])  # (k, d)

        # 2. Layer by layer, each seeing the updates below it.
        modules = {layer: get_module(model, self._module_name(model, layer)) for layer in self.layers}
        # A sharded (FSDP2) weight is gathered - the edited matrices only - and written back shard by shard.
        originals = {layer: full_weight(module.weight).clone() for layer, module in modules.items()}
        updates: dict[str, Update] = {}
        layer_traces: list[MEMITLayerTrace] = []
        batch_keys: dict[int, torch.Tensor] = {}
        try:
            for j, layer in enumerate(self.layers):
                module = modules[layer]
                weight = module.weight
                keys = torch.stack([
                    compute_key(model, tokenizer, module, r, self.context_template_groups, self.fact_token)
                    for r in requests
                ], dim=1)  # K: (d_in, k)
                keys = current_split().broadcast_(keys.contiguous())  # bit for bit the same keys on every rank
                batch_keys[layer] = keys
                current = fact_representations(model, tokenizer, site, requests, self.fact_token, "out")
                missing = (targets.to(current.device) - current).T  # R: (d, k)
                residual = missing.double() / (len(self.layers) - j)  # R_l
                key_factor = self._solve(layer, keys)  # (lambda C + K K^T)^{-1} K: (d_in, k)
                out_dtype = weight.dtype if torch.finfo(weight.dtype).bits > 32 else torch.float32
                left, right = rank_one_in_layout(
                    module,
                    residual.to(device=weight.device, dtype=out_dtype),
                    key_factor.to(device=weight.device, dtype=out_dtype),
                )
                updates[self._module_name(model, layer) + ".weight"] = LowRankUpdate(left, right)
                layer_traces.append(self._layer_trace(layer, keys, residual, missing))
                if j < len(self.layers) - 1:  # the layers above see this one's update
                    write_weight(weight, full_weight(weight).float() + (left @ right.T).float())
        finally:
            for layer, module in modules.items():
                write_weight(module.weight, originals[layer])
        self._batch_done(batch_keys, requests)

        self.last_trace = [
            MEMITTrace(case_id=request.case_id, delta=value.delta.detach().cpu(), target=value.target.detach().cpu(),
                       nll_init=value.nll_init, nll_final=value.nll, loss_init=value.loss_init,
                       loss_final=value.loss, steps=value.steps)
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
        }
        for trace in layer_traces:
            self.last_metrics[f"residual_norm/layer_{trace.layer}"] = trace.residual_norm
        self.last_metrics.update(self._extra_metrics(layer_traces))
        return updates

    # ------------------------------------------------------------------------------------------------------------
    # what a variant (AlphaEdit) changes
    # ------------------------------------------------------------------------------------------------------------

    def _layer_trace(self, layer: int, keys: torch.Tensor, residual: torch.Tensor,
                     missing: torch.Tensor) -> MEMITLayerTrace:
        return MEMITLayerTrace(layer=layer, keys=keys.detach().float().cpu(), residual=residual.float().cpu(),
                               residual_norm=float(missing.float().norm(dim=0).mean()))

    def _batch_done(self, batch_keys: dict[int, torch.Tensor], requests: Sequence) -> None:
        """Called once a batch's updates are computed, with its keys per layer (MEMIT keeps nothing)."""

    def _extra_metrics(self, layer_traces: Sequence[MEMITLayerTrace]) -> dict[str, float]:
        """Metrics a variant adds to ``last_metrics`` (MEMIT: none)."""
        return {}

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

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
                f"MEMIT with v_loss_layer={loss_layer} below the last layer on a sharded (FSDP) model: the final norm "
                "and head would run outside the model's forward, on sharded weights. Use the last layer (the presets "
                "do)."
            )
        return get_module(model, self._layer_name(model, loss_layer))

    def _solve(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """``(lambda C_l + K K^T)^{-1} K`` in float64 (``C_l`` the identity without ``mom2_adjustment``)."""
        moment = self._mom2.get(layer)
        device = moment.device if moment is not None else keys.device
        keys = keys.to(device=device, dtype=torch.float64)
        if moment is None:
            system = self.mom2_update_weight * torch.eye(keys.shape[0], dtype=torch.float64, device=device)
        else:
            system = self.mom2_update_weight * moment.to(torch.float64)
        system = system + keys @ keys.T
        return torch.linalg.solve(system, keys)

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
            f"mom2_update_weight={self.mom2_update_weight}, mom2_adjustment={self.mom2_adjustment})"
        )
