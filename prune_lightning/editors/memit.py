r"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

The idea. ROME writes one fact into one MLP out-projection. MEMIT writes a whole batch of ``k`` facts at once and
spreads each of them over a *range* of consecutive layers ``l_1 < ... < l_L`` (GPT-2 XL: 13-17), so no single matrix
has to carry a large change. Each out-projection ``W_l`` is again read as a linear key-value memory: the input of
``W_l`` at the subject's last token is a key, ``W_l k`` is the value added to the residual stream.

1. Targets. For every request ``i`` MEMIT finds the hidden state ``z_i`` the *last* edited layer should emit at the
   subject's last token for the model to say the new object. That is ROME's value optimisation, with the free vector
   added to the output of layer ``l_L``::

       delta_i = argmin  target NLL + kl_factor * KL + v_weight_decay * ||delta||^2 / ||h_i||^2,
                         ||delta|| <= clamp_norm_factor * ||h_i||
       z_i     = h_i + delta_i

   where ``h_i`` is the output of layer ``l_L`` at the subject's last token of the plain prompt, on the unedited
   model. All targets are computed before any weight changes (this module calls :class:`~.rome.ROME`'s
   ``_compute_delta`` with ``layer = layers[-1]``).

2. Layer by layer, bottom to top. For ``j = 0 .. L-1`` and layer ``l = l_{j+1}``, on the weights as updated so far:

   - keys ``K = [k_1 .. k_k]`` (``d_in x k``): the input of ``W_l`` at each subject's last token, averaged over the
     context templates (ROME's key, read at layer ``l``);
   - the residual still missing at the top, ``R = [z_i - h_i^cur]`` (``d x k``), where ``h_i^cur`` is the current
     output of layer ``l_L`` at the subject's last token;
   - this layer's share of it, ``R_l = R / (L - j)`` (the remaining layers take the rest; the last one all that is
     left);
   - the update that makes ``W_l`` output ``R_l`` more at the new keys while disturbing the values of the keys seen
     in ordinary text as little as possible::

         minimise   sum_i || dW k_i - R_l[:, i] ||^2  +  lambda * E_k || dW k ||^2
         =>         dW_l (lambda C_l + K K^T) = R_l K^T
         =>         dW_l = R_l [ (lambda C_l + K K^T)^{-1} K ]^T                        (out x in)

     with ``C_l = E[k k^T]`` the per-token second moment of the keys of ``W_l`` over a text corpus
     (:func:`~prune_lightning.editors.stats.second_moment`) and ``lambda = mom2_update_weight``. The solve is done in
     float64. ``dW_l`` is a value factor ``R_l`` (``d x k``) times a key factor ``(lambda C + K K^T)^{-1} K``
     (``d_in x k``): rank ``<= k``.
   - ``dW_l`` is written into ``W_l`` for the moment, so the keys and hidden states of the layers above see it.

   With ``mom2_adjustment=False``, ``C_l`` is the identity.

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

from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.editors.rome import ROME, _hidden_size, _hooks, _prepared
from prune_lightning.editors.stats import _model_device, _pad_id, pad_right, second_moment, second_moments
from prune_lightning.models import (full_weight, get_module, is_transposed, layer_template, linear_weight_names,
                                    mlp_out_template, rank_one_in_layout, write_weight)

__all__ = ["MEMIT", "MEMIT_PRESETS", "MEMITTrace", "MEMITLayerTrace"]

# The published hyperparameters: MEMIT's GPT-2 XL setting; EasyEdit's LLaMA settings (used by the PRUNE paper).
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
        steps: Adam steps taken.
    """

    case_id: Union[int, str]
    delta: torch.Tensor
    target: torch.Tensor
    nll_init: float
    nll_final: float
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


class _StopForward(Exception):
    """Raised by a hook once the hidden states it needs are captured: the layers above are not needed."""


class MEMIT(Editor):
    """Mass-Editing Memory in a Transformer: one batch of facts spread over several MLP out-projections.

    Args:
        layers: Indices of the layers whose MLP out-projections are edited, strictly increasing; the targets are
            set at the output of the last one.
        module_template: Name template of the edited modules (default by model type, e.g.
            ``transformer.h.{}.mlp.c_proj`` for GPT-2, ``model.layers.{}.mlp.down_proj`` for LLaMA).
        layer_module_template: Name template of a transformer block (default by model type, e.g.
            ``transformer.h.{}``).
        fact_token: Where keys and hidden states are read: ``"subject_last"`` or ``"last"`` (the prompt's last token).
        v_num_grad_steps: Adam steps of the target optimisation.
        v_lr: Adam learning rate of the target optimisation.
        v_loss_layer: Layer whose output gives the target NLL (default: the last layer, i.e. the model's logits).
        v_weight_decay: Weight of ``||delta||^2 / ||h||^2`` in the target loss.
        clamp_norm_factor: ``||delta||`` is clamped to this multiple of ``||h||`` after every step.
        kl_factor: Weight of the KL term on the ``"{subject} is a"`` prompt.
        early_stop_loss: Stop a target optimisation once the target NLL is below this.
        mom2_adjustment: Weigh the update by the keys' second moment ``C_l`` (False: ``C_l`` is the identity).
        mom2_update_weight: ``lambda`` in ``(lambda C_l + K K^T)``: how strongly the values of ordinary keys are kept.
        mom2_corpus: Corpus for ``C_l``: hub dataset ``"id[:config]"`` or a local ``.txt`` / ``.jsonl`` file.
        mom2_n_samples: Number of corpus documents ``C_l`` is computed over.
        mom2_dtype: Accumulation dtype of ``C_l`` (``"float32"`` or ``"float64"``).
        stats_file: Precomputed ``C_l`` (safetensors or ``.npy``) instead of computing them: a path template with
            one ``{}`` for the layer index (``"stats/layer{}.safetensors"``), a ``{layer: path}`` mapping, or a single
            path when only one layer is edited.
        context_templates: Explicit context templates (each with one ``{}`` where the prompt goes); default:
            generated from the model in :meth:`setup`.
        context_template_lengths: ``(length in tokens, count)`` pairs of generated templates; the plain ``"{}"``
            template is always added.
        seed: Seed of the template generation.
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
        mom2_corpus: str = "wikitext:wikitext-103-raw-v1",
        mom2_n_samples: int = 100000,
        mom2_dtype: str = "float32",
        stats_file: Union[str, dict[int, str], None] = None,
        context_templates: Optional[list[str]] = None,
        context_template_lengths: tuple = ((10, 5),),
        seed: int = 0,
    ) -> None:
        layers = list(layers) if not isinstance(layers, (int, str)) else layers
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if any(isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in layers):
            raise ValueError(f"layers must hold integer layer indices >= 0, got {layers!r}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing (edited bottom to top), got {layers!r}")
        if not mom2_update_weight > 0:
            raise ValueError(f"mom2_update_weight must be positive, got {mom2_update_weight}")
        if mom2_n_samples < 1:
            raise ValueError(f"mom2_n_samples must be a positive number of documents, got {mom2_n_samples}")
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
        self.context_template_lengths = tuple((int(n), int(c)) for n, c in context_template_lengths)
        self.seed = int(seed)
        self._given_templates = list(context_templates) if context_templates is not None else None
        # The value step is ROME's: building it here also checks fact_token, v_*, clamp_norm_factor and templates.
        self._value_editor: ROME = self._make_value_editor()
        self._ready = False
        self.context_templates: Optional[list[str]] = None
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
        hidden = _hidden_size(model)
        for layer in self.layers:
            module = get_module(model, self._module_name(model, layer))
            out_dim = module.weight.shape[1] if is_transposed(module) else module.weight.shape[0]
            if out_dim != hidden:
                raise ValueError(
                    f"{self._module_name(model, layer)} outputs {out_dim} features, but the residual stream has "
                    f"{hidden}: MEMIT edits matrices that write into the residual stream (MLP out-projections)"
                )
        value_editor = self._make_value_editor()
        value_editor.setup(model, tokenizer)  # checks the block and v_loss_layer, builds the templates
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
        self._value_editor = value_editor
        self.context_templates = list(value_editor.context_templates)
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
        value_editor = self._value_editor
        top = self.layers[-1]

        # 1. The targets z_i at the output of the last edited layer, all on the unedited model.
        traces = []
        for request in requests:
            delta, nll_init, nll_final, steps = value_editor._compute_delta(model, tokenizer, request)
            traces.append((request.case_id, delta, nll_init, nll_final, steps))
        h_start = self._fact_hidden(model, tokenizer, requests, top)  # (k, d)
        deltas = torch.stack([t[1].to(h_start.device) for t in traces])
        targets = h_start + deltas  # (k, d)

        # 2. Layer by layer, each seeing the updates below it.
        modules = {layer: get_module(model, self._module_name(model, layer)) for layer in self.layers}
        # A sharded (FSDP2) weight is gathered - the edited matrices only - and written back shard by shard.
        originals = {layer: full_weight(module.weight).clone() for layer, module in modules.items()}
        updates: dict[str, Update] = {}
        layer_traces: list[MEMITLayerTrace] = []
        try:
            for j, layer in enumerate(self.layers):
                module = modules[layer]
                weight = module.weight
                keys = torch.stack(
                    [value_editor._compute_key(model, tokenizer, module, r) for r in requests], dim=1
                )  # K: (d_in, k)
                current = h_start if j == 0 else self._fact_hidden(model, tokenizer, requests, top)
                missing = (targets - current).T  # R: (d, k)
                residual = missing.double() / (len(self.layers) - j)  # R_l
                key_factor = self._solve(layer, keys)  # (lambda C + K K^T)^{-1} K: (d_in, k)
                out_dtype = weight.dtype if torch.finfo(weight.dtype).bits > 32 else torch.float32
                left, right = rank_one_in_layout(
                    module,
                    residual.to(device=weight.device, dtype=out_dtype),
                    key_factor.to(device=weight.device, dtype=out_dtype),
                )
                updates[self._module_name(model, layer) + ".weight"] = LowRankUpdate(left, right)
                layer_traces.append(
                    MEMITLayerTrace(
                        layer=layer,
                        keys=keys.detach().float().cpu(),
                        residual=residual.float().cpu(),
                        residual_norm=float(missing.float().norm(dim=0).mean()),
                    )
                )
                if j < len(self.layers) - 1:  # the layers above see this one's update
                    write_weight(weight, full_weight(weight).float() + (left @ right.T).float())
        finally:
            for layer, module in modules.items():
                write_weight(module.weight, originals[layer])

        self.last_trace = [
            MEMITTrace(case_id=case_id, delta=delta.detach().cpu(), target=target.detach().cpu(),
                       nll_init=nll_init, nll_final=nll_final, steps=steps)
            for (case_id, delta, nll_init, nll_final, steps), target in zip(traces, targets)
        ]
        self.last_layers = layer_traces
        n = len(self.last_trace)
        self.last_metrics = {
            "loss": sum(t.nll_final for t in self.last_trace) / n,
            "loss_init": sum(t.nll_init for t in self.last_trace) / n,
            "v_steps": sum(t.steps for t in self.last_trace) / n,
            "delta_norm": sum(float(t.delta.norm()) for t in self.last_trace) / n,
        }
        for trace in layer_traces:
            self.last_metrics[f"residual_norm/layer_{trace.layer}"] = trace.residual_norm
        return updates

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _make_value_editor(self) -> ROME:
        """The ROME whose key and value computations MEMIT uses, its layer set to the last edited layer."""
        return ROME(
            layer=self.layers[-1],
            module_template=self.module_template,
            layer_module_template=self.layer_module_template,
            fact_token=self.fact_token,
            v_num_grad_steps=self.v_num_grad_steps,
            v_lr=self.v_lr,
            v_loss_layer=self.v_loss_layer,
            v_weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            kl_factor=self.kl_factor,
            early_stop_loss=self.early_stop_loss,
            mom2_adjustment=False,  # MEMIT solves with its own per-layer statistics
            context_templates=self._given_templates,
            context_template_lengths=self.context_template_lengths,
            seed=self.seed,
        )

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

    def _fact_hidden(self, model: nn.Module, tokenizer, requests: Sequence, layer: int) -> torch.Tensor:
        """The output of block ``layer`` at each request's fact token of its plain prompt: ``(k, d)`` float32."""
        encoded = [self._value_editor._encode(tokenizer, "{}", r.prompt, r.subject) for r in requests]
        device = _model_device(model)
        input_ids, attention_mask = pad_right([ids for ids, _ in encoded], _pad_id(tokenizer), device)
        rows = torch.arange(len(encoded), device=device)
        cols = torch.tensor([idx for _, idx in encoded], device=device)
        captured: dict[str, torch.Tensor] = {}

        def capture(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured["hidden"] = hidden[rows.to(hidden.device), cols.to(hidden.device)].detach().float()
            raise _StopForward

        block = get_module(model, self._layer_name(model, layer))
        with _prepared(model), _hooks(block.register_forward_hook(capture)), torch.no_grad():
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        if "hidden" not in captured:
            raise RuntimeError(f"The forward pass never reached {self._layer_name(model, layer)}")
        return captured["hidden"]

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

