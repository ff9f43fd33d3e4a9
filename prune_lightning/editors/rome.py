r"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

The idea. ROME reads the out-projection ``W`` of one mid-layer MLP as a linear key-value memory: the MLP's hidden
activation at the last token of a subject ("Danielle Darrieux") is a *key* ``k``, and ``W k`` is the *value* written
into the residual stream, which later layers turn into the facts about that subject. To change one fact
(``"The mother tongue of Danielle Darrieux is" -> "English"``) ROME finds the key of the subject, a value that makes
the model say the new object, and writes the association ``k* -> v*`` into ``W`` with the smallest update that keeps
the other keys' values as they were.

1. The key ``k*``. Run the prompt, prefixed by a few short generated texts (context templates, so that the key does
   not depend on one exact wording), and read the input of ``W`` at the subject's last token::

       k* = mean over templates c of  input_of_W( c + prompt(subject) )[subject's last token]

   (``fact_token="last"`` reads it at the prompt's last token instead.)

2. The value ``v*``. Add a free vector ``delta`` to the output of the layer at the subject's last token, in every
   templated prompt, and fit it with Adam so the model continues each prompt with the new target::

       L(delta) =  mean_c  -1/|y| * sum_i log p(y_i | c + prompt, y_<i ; delta)          (target NLL, teacher-forced)
                + kl_factor      * KL( p(. | "{subject} is a") || p(. | "{subject} is a" ; delta) )   (keep the essence)
                + v_weight_decay * ||delta||^2 / ||h||^2                                        (stay small)

   where ``y = " " + target_new``, ``h`` is the layer's original output at that position, and after every step
   ``||delta|| <= clamp_norm_factor * ||h||``. The optimisation stops early once the target NLL falls below
   ``early_stop_loss``. Since the layer's output is ``residual + W k + b``, adding ``delta`` there is the same as
   asking ``W`` to output ``v* = W k* + delta`` at the key ``k*``.

3. The update. Among all ``W'`` with ``W' k* = v*``, ROME takes the one that changes the values of the other keys
   least, measured over the key distribution with second moment ``C = E[k k^T]`` (see :mod:`.stats`). In ``(out, in)``
   terms that is the rank-one matrix::

       W' = W + (v* - W k*) (C^{-1} k*)^T / (k*^T C^{-1} k*)

   i.e. a value vector ``u = (v* - W k*) / (k*^T C^{-1} k*)`` (output space) times a key vector ``C^{-1} k*`` (input
   space). Check: ``W' k* = W k* + (v* - W k*) = v*``; a key ``x`` with ``x^T C^{-1} k* = 0`` keeps its value.
   With ``mom2_adjustment=False``, ``C`` is the identity. ``W k`` is the module's linear map without its bias
   (for GPT-2's ``Conv1D``, ``k @ weight``).

A batch of requests is edited one after another: each request's update is written into the weight temporarily so the
next one sees it, the original weight is restored before returning, and the factors are concatenated (rank <= batch
size). :meth:`ROME.compute_update` therefore leaves the model as it found it; the caller writes the returned
:class:`~prune_lightning.editors.base.LowRankUpdate`.

Several processes. Inside :func:`~prune_lightning.distributed.split_work` (``SequentialEditor`` on several processes)
the rows of steps 1 and 2 - one per context template, plus the KL prompt - are spread over the ranks and their sums
all-reduced, so every rank computes the same ``k*`` and ``delta`` as one process would (to float tolerance), with a
share of the work. On a sharded model the split is even: a rank with fewer rows pads its batch with rows outside the
loss, since every forward and backward there is a collective.

Hyperparameters default to the paper's GPT-2 XL setting; :data:`ROME_PRESETS` and :meth:`ROME.preset` hold the
published ones per model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.distributed import current_split
from prune_lightning.editors.stats import _input_dim, _model_device, _pad_id, pad_right, second_moment
from prune_lightning.models import (full_weight, get_module, is_sharded_model, is_transposed, layer_template,
                                    linear_weight_names, mlp_out_template, rank_one_in_layout, write_weight)

__all__ = ["ROME", "ROME_PRESETS", "ROMETrace"]

# The published hyperparameters (ROME's GPT-2 XL setting; EasyEdit's LLaMA settings, used by the PRUNE paper).
ROME_PRESETS: dict[str, dict] = {
    "gpt2-xl": dict(
        layer=17,
        fact_token="subject_last",
        v_num_grad_steps=20,
        v_lr=0.5,
        v_loss_layer=47,
        v_weight_decay=0.5,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
        mom2_adjustment=True,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((5, 10), (10, 10)),
    ),
    "llama2-7b": dict(
        layer=5,
        fact_token="subject_last",
        v_num_grad_steps=25,
        v_lr=0.5,
        v_loss_layer=31,
        v_weight_decay=1e-3,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
        mom2_adjustment=False,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((5, 10), (10, 10)),
    ),
}
# LLaMA-3-8B uses the LLaMA-2-7B hyperparameters (PRUNE, appendix).
ROME_PRESETS["llama3-8b"] = dict(ROME_PRESETS["llama2-7b"])

_FACT_TOKENS = ("subject_last", "last")
# Openings of the generated context templates (cycled through).
_TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")
_TEMPLATE_TOP_K = 5
# The prompt whose next-token distribution the KL term keeps: what the model thinks the subject *is*.
_KL_PROMPT = "{} is a"


@dataclass
class ROMETrace:
    """What ROME computed for one request (for logging and inspection; see ``ROME.last_trace``).

    Args:
        case_id: The request's ``case_id``.
        key: ``k*``, the averaged key (input space, float32).
        value: ``v* = W k* + delta``, the value written at ``k*`` (output space, float32).
        delta: The optimised change of the layer's output.
        nll_init: Mean NLL of the target before the optimisation.
        nll_final: Mean NLL of the target with ``delta`` added.
        steps: Adam steps taken.
    """

    case_id: Union[int, str]
    key: torch.Tensor
    value: torch.Tensor
    delta: torch.Tensor
    nll_init: float
    nll_final: float
    steps: int


class ROME(Editor):
    """Rank-One Model Editing: one rank-one update of an MLP out-projection per request.

    Args:
        layer: Index of the layer whose MLP out-projection is edited.
        module_template: Name template of the edited module (default by model type, e.g.
            ``transformer.h.{}.mlp.c_proj`` for GPT-2, ``model.layers.{}.mlp.down_proj`` for LLaMA).
        layer_module_template: Name template of a transformer block, whose output ``delta`` is added to (default by
            model type, e.g. ``transformer.h.{}``).
        fact_token: Where the key is read: ``"subject_last"`` (the subject's last token) or ``"last"`` (the
            prompt's last token).
        v_num_grad_steps: Adam steps of the value optimisation.
        v_lr: Adam learning rate of the value optimisation.
        v_loss_layer: Layer whose output gives the target NLL (default: the last layer, i.e. the model's logits).
        v_weight_decay: Weight of ``||delta||^2 / ||h||^2`` in the loss.
        clamp_norm_factor: ``||delta||`` is clamped to this multiple of ``||h||`` after every step.
        kl_factor: Weight of the KL term on the ``"{subject} is a"`` prompt.
        early_stop_loss: Stop the optimisation once the target NLL is below this.
        mom2_adjustment: Shape the update by the keys' second moment ``C`` (False: ``C`` is the identity).
        mom2_corpus: Corpus for ``C``: hub dataset ``"id[:config]"`` or a local ``.txt`` / ``.jsonl`` file.
        mom2_n_samples: Number of corpus documents ``C`` is computed over.
        mom2_dtype: Accumulation dtype of ``C`` (``"float32"`` or ``"float64"``).
        stats_file: Precomputed ``C`` (safetensors or ``.npy``) instead of computing it.
        context_templates: Explicit context templates (each with one ``{}`` where the prompt goes); default:
            generated from the model in :meth:`setup`.
        context_template_lengths: ``(length in tokens, count)`` pairs of generated templates; the plain ``"{}"``
            template is always added.
        seed: Seed of the template generation.
    """

    presets = ROME_PRESETS

    def __init__(
        self,
        layer: int = 17,
        module_template: Optional[str] = None,
        layer_module_template: Optional[str] = None,
        fact_token: str = "subject_last",
        v_num_grad_steps: int = 20,
        v_lr: float = 0.5,
        v_loss_layer: Optional[int] = None,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 4.0,
        kl_factor: float = 0.0625,
        early_stop_loss: float = 0.05,
        mom2_adjustment: bool = True,
        mom2_corpus: str = "wikitext:wikitext-103-raw-v1",
        mom2_n_samples: int = 100000,
        mom2_dtype: str = "float32",
        stats_file: Optional[str] = None,
        context_templates: Optional[list[str]] = None,
        context_template_lengths: tuple = ((5, 10), (10, 10)),
        seed: int = 0,
    ) -> None:
        if fact_token not in _FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {_FACT_TOKENS}, got {fact_token!r}")
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        if v_num_grad_steps < 0:
            raise ValueError(f"v_num_grad_steps must be >= 0, got {v_num_grad_steps}")
        if v_lr <= 0:
            raise ValueError(f"v_lr must be positive, got {v_lr}")
        if clamp_norm_factor <= 0:
            raise ValueError(f"clamp_norm_factor must be positive, got {clamp_norm_factor}")
        for name, value in (("v_weight_decay", v_weight_decay), ("kl_factor", kl_factor)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        lengths = tuple((int(length), int(count)) for length, count in context_template_lengths)
        if any(length < 1 or count < 0 for length, count in lengths):
            raise ValueError(f"context_template_lengths must hold (length >= 1, count >= 0) pairs, got {lengths}")
        if context_templates is not None:
            context_templates = [_check_template(t) for t in context_templates]
            if not context_templates:
                raise ValueError("context_templates is empty; give at least '{}'")
        self.layer = int(layer)
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
        self.mom2_corpus = mom2_corpus
        self.mom2_n_samples = int(mom2_n_samples)
        self.mom2_dtype = mom2_dtype
        self.stats_file = stats_file
        self.context_template_lengths = lengths
        self.seed = int(seed)
        self._given_templates = context_templates
        self.context_templates: Optional[list[str]] = None
        self._mom2_lu: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.last_trace: list[ROMETrace] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------------
    # the Editor protocol
    # ------------------------------------------------------------------------------------------------------------

    def parameter_names(self, model: nn.Module) -> list[str]:
        """``[module_template.format(layer) + ".weight"]``; an unknown module raises a ``ValueError`` listing them.

        Args:
            model: The model to edit.
        """
        return linear_weight_names(model, self.module_template or mlp_out_template(model), [self.layer])

    def setup(self, model: nn.Module, tokenizer) -> None:
        """Checks the modules, loads or computes ``C`` and builds the context templates.

        Args:
            model: The model to edit.
            tokenizer: Its tokenizer.
        """
        self.parameter_names(model)
        get_module(model, self._layer_name(model, self.layer))
        loss_layer = self._loss_layer(model)
        num_layers = _num_layers(model)
        if num_layers is not None and not 0 <= loss_layer < num_layers:
            raise ValueError(f"v_loss_layer={loss_layer} is out of range for a model with {num_layers} layers")
        if loss_layer != self.layer:
            get_module(model, self._layer_name(model, loss_layer))
        self._mom2_lu = None
        if self.mom2_adjustment:
            module_name = self._module_name(model)
            moment = second_moment(
                model,
                tokenizer,
                module_name,
                corpus=self.mom2_corpus,
                n_samples=self.mom2_n_samples,
                dtype=self.mom2_dtype,
                stats_file=self.stats_file,
            )
            device = get_module(model, module_name).weight.device
            # C is factored once; each edit then solves C x = k* in O(d^2).
            self._mom2_lu = torch.linalg.lu_factor(moment.to(device=device, dtype=torch.float64))
        if self._given_templates is not None:
            self.context_templates = list(self._given_templates)
        else:
            self.context_templates = ["{}"] + _generate_context_templates(
                model, tokenizer, self.context_template_lengths, self.seed
            )

    def compute_update(self, model: nn.Module, tokenizer, requests: Sequence) -> dict[str, Update]:
        """The rank-``len(requests)`` update of the edited matrix that writes the requests' new targets.

        Requests are processed in order, each seeing the previous ones' updates; the model's weights are the same
        after the call as before.

        Args:
            model: The model to edit (not modified).
            tokenizer: Its tokenizer.
            requests: ``EditRequest`` objects (``prompt``, ``subject``, ``target_new``, ``case_id`` are used).
        """
        if self.context_templates is None or (self.mom2_adjustment and self._mom2_lu is None):
            self.setup(model, tokenizer)
        if not requests:
            raise ValueError("compute_update needs at least one request")
        param_name = self.parameter_names(model)[0]
        module = get_module(model, self._module_name(model))
        weight = module.weight
        # A sharded (FSDP2) weight is gathered - this one matrix only - and written back shard by shard.
        original = full_weight(weight).clone() if len(requests) > 1 else None
        lefts, rights, traces = [], [], []
        try:
            for i, request in enumerate(requests):
                left, right, trace = self._edit_one(model, tokenizer, module, request)
                lefts.append(left)
                rights.append(right)
                traces.append(trace)
                if i < len(requests) - 1:  # the next request sees this one
                    write_weight(weight, full_weight(weight).float() + (left @ right.T).float())
        finally:
            if original is not None:
                write_weight(weight, original)
        self.last_trace = traces
        self.last_metrics = {
            "loss": sum(t.nll_final for t in traces) / len(traces),
            "loss_init": sum(t.nll_init for t in traces) / len(traces),
            "v_steps": sum(t.steps for t in traces) / len(traces),
            "delta_norm": sum(float(t.delta.norm()) for t in traces) / len(traces),
        }
        return {param_name: LowRankUpdate(torch.cat(lefts, dim=1), torch.cat(rights, dim=1))}

    # ------------------------------------------------------------------------------------------------------------
    # one request
    # ------------------------------------------------------------------------------------------------------------

    def _edit_one(
        self, model: nn.Module, tokenizer, module: nn.Module, request
    ) -> tuple[torch.Tensor, torch.Tensor, ROMETrace]:
        """The rank-one factors ``(left, right)`` (parameter layout) for one request, and what led to them."""
        key = self._compute_key(model, tokenizer, module, request)
        delta, nll_init, nll_final, steps = self._compute_delta(model, tokenizer, request)
        weight = module.weight
        current = _linear(module, key)  # W k*
        value = current + delta  # v*: what the matrix should output at k*
        key_direction = self._solve_mom2(key)  # C^{-1} k*
        denominator = torch.dot(key.double(), key_direction)  # k*^T C^{-1} k*
        value_vec = (value - current).double() / denominator  # u = (v* - W k*) / (k*^T C^{-1} k*)
        out_dtype = weight.dtype if torch.finfo(weight.dtype).bits > 32 else torch.float32
        left, right = rank_one_in_layout(
            module, value_vec.to(device=weight.device, dtype=out_dtype), key_direction.to(weight.device, out_dtype)
        )
        trace = ROMETrace(
            case_id=request.case_id,
            key=key.detach().cpu(),
            value=value.detach().cpu(),
            delta=delta.detach().cpu(),
            nll_init=nll_init,
            nll_final=nll_final,
            steps=steps,
        )
        return left, right, trace

    def _compute_key(self, model: nn.Module, tokenizer, module: nn.Module, request) -> torch.Tensor:
        """``k*``: the input of the edited module at the fact token, averaged over the context templates.

        Under :func:`~prune_lightning.distributed.split_work` each rank runs its share of the templates (rows
        ``rank::world_size``); the key sums are all-reduced and divided by the number of templates on every rank.
        """
        split = current_split()
        n_templates = len(self.context_templates)
        templates = [self.context_templates[i] for i in split.rows(n_templates)]
        n_mine = len(templates)
        # An even split (sharded model): padding rows (the first template again) up to every rank's count; their
        # keys are not summed.
        templates += [self.context_templates[0]] * (split.padded_rows(n_templates) - n_mine)
        captured: dict[str, torch.Tensor] = {}
        if templates:
            variants = [self._encode(tokenizer, t, request.prompt, request.subject) for t in templates]
            seqs = [ids for ids, _ in variants]
            rows = torch.arange(len(seqs))
            cols = torch.tensor([idx for _, idx in variants])

            def capture(_module, args):
                captured["keys"] = args[0][rows.to(args[0].device), cols.to(args[0].device)].detach()

            input_ids, attention_mask = pad_right(seqs, _pad_id(tokenizer), _model_device(model))
            with _prepared(model), _hooks(module.register_forward_pre_hook(capture)), torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if not split.active:
            return captured["keys"].float().mean(dim=0)
        if n_mine:
            total = captured["keys"][:n_mine].float().sum(dim=0)
        else:  # more ranks than templates: this one only joins the sum
            total = torch.zeros(_input_dim(module), dtype=torch.float32, device=module.weight.device)
        return split.all_reduce_sum_(total) / n_templates

    def _compute_delta(self, model: nn.Module, tokenizer, request) -> tuple[torch.Tensor, float, float, int]:
        """Optimises the change ``delta`` of the layer's output that makes the model say ``target_new``.

        Returns ``(delta, NLL before, NLL after, steps)``; ``delta`` is float32 on the model's device.

        Under :func:`~prune_lightning.distributed.split_work` the rows (context templates, then the KL prompt) are
        spread over the ranks (rows ``rank::world_size``). Each rank computes its rows' part of the loss and its
        gradient with respect to ``delta``; the gradients and the target NLL (for early stopping) are all-reduced,
        the weight decay's gradient is added on every rank, and every rank takes the same Adam step - so ``delta``
        is the single-process one to float tolerance, and bit-identical on all ranks. ``h`` (the layer's output at
        the plain prompt, row 0) is broadcast from rank 0.
        """
        split = current_split()
        device = _model_device(model)
        target_ids = _target_ids(tokenizer, request.rendered_prompt, request.target_new)
        if not target_ids:
            raise ValueError(f"target_new {request.target_new!r} of case {request.case_id} tokenizes to nothing")

        # Rows 0..n-1: each context template + prompt, teacher-forced with the target; row n: the KL prompt.
        # This rank's rows keep that order (its rewrite rows first, then the KL row if it is one of them).
        n_rewrite = len(self.context_templates)
        mine = split.rows(n_rewrite + 1)
        seqs, lookup, target_pos = [], [], []
        for row in (r for r in mine if r < n_rewrite):
            ids, idx = self._encode(tokenizer, self.context_templates[row], request.prompt, request.subject)
            seqs.append(ids + target_ids[:-1])
            lookup.append(idx)
            target_pos.append([len(ids) - 1 + i for i in range(len(target_ids))])
        n_local = len(target_pos)  # this rank's rewrite rows
        kl_row: Optional[int] = None  # the KL prompt's row in this rank's batch
        kl_idx = 0
        if n_rewrite in mine:
            kl_ids, kl_idx = self._encode(tokenizer, "{}", _KL_PROMPT, request.subject)
            kl_row = len(seqs)
            seqs.append(kl_ids)
            lookup.append(kl_idx)
        owns_plain_prompt = bool(mine) and mine[0] == 0  # row 0: the "{}" template, where h is read
        # An even split (sharded model): padding rows (the first template, teacher-forced) up to every rank's
        # count, outside the loss; every rank then runs the same forward and backward.
        n_padding = split.padded_rows(n_rewrite + 1) - len(seqs)
        if n_padding:
            padding_ids, padding_idx = self._encode(tokenizer, self.context_templates[0], request.prompt,
                                                    request.subject)
            seqs += [padding_ids + target_ids[:-1]] * n_padding
            lookup += [padding_idx] * n_padding

        if seqs:
            input_ids, attention_mask = pad_right(seqs, _pad_id(tokenizer), device)
            rows = torch.arange(len(seqs), device=device)
            cols = torch.tensor(lookup, device=device)
        if n_local:
            tgt_rows = torch.arange(n_local, device=device)[:, None].expand(-1, len(target_ids))
            tgt_cols = torch.tensor(target_pos, device=device)
            tgt_ids = torch.tensor(target_ids, device=device)[None, :].expand(n_local, -1)

        hidden_size = _hidden_size(model)
        delta = torch.zeros(hidden_size, dtype=torch.float32, device=device, requires_grad=True)
        state: dict[str, torch.Tensor] = {}

        def add_delta(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if "h_init" not in state and owns_plain_prompt:  # the original output at the plain prompt's fact token
                state["h_init"] = hidden[0, cols[0]].detach().float()
            picked = hidden[rows, cols] + delta.to(hidden.dtype)
            hidden = hidden.index_put((rows, cols), picked)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        loss_layer = self._loss_layer(model)
        num_layers = _num_layers(model)
        use_logits = num_layers is None or loss_layer == num_layers - 1  # else: final norm + head on that layer
        if not use_logits and is_sharded_model(model):
            raise NotImplementedError(
                f"ROME with v_loss_layer={loss_layer} below the last layer on a sharded (FSDP) model: the final norm "
                "and head would run outside the model's forward, on sharded weights. Use the last layer (the "
                "presets do)."
            )
        captured: dict[str, torch.Tensor] = {}

        def capture_hidden(_module, _args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output

        block = get_module(model, self._layer_name(model, self.layer))
        handles = [block.register_forward_hook(add_delta)]
        if not use_logits:
            handles.append(get_module(model, self._layer_name(model, loss_layer)).register_forward_hook(capture_hidden))

        optimizer = torch.optim.Adam([delta], lr=self.v_lr)
        kl_init: Optional[torch.Tensor] = None
        nll_init = nll = math.nan
        steps = 0
        with _prepared(model, freeze=True), _hooks(*handles):
            for step in range(self.v_num_grad_steps + 1):
                optimizer.zero_grad()
                local_loss: Optional[torch.Tensor] = None  # this rank's rows' part of the loss
                if seqs:
                    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    logits = out.logits if use_logits else _logits_from_hidden(model, captured["hidden"])
                if n_local:
                    log_probs = torch.log_softmax(logits[tgt_rows, tgt_cols].float(), dim=-1)
                    token_nll = -log_probs.gather(-1, tgt_ids[..., None]).squeeze(-1)
                    row_nll = token_nll.mean(dim=1)
                if kl_row is not None:
                    kl_log_probs = torch.log_softmax(logits[kl_row, kl_idx].float(), dim=-1)
                    if kl_init is None:
                        kl_init = kl_log_probs.detach()
                    kl_loss = torch.sum(kl_init.exp() * (kl_init - kl_log_probs))
                if split.active and step == 0:
                    h_init = state.get("h_init")
                    state["h_init"] = split.broadcast_(
                        h_init if h_init is not None else torch.zeros(hidden_size, dtype=torch.float32, device=device)
                    )
                h_norm = state["h_init"].norm()
                decay_loss = delta.pow(2).sum() / h_norm.pow(2)
                if not split.active:
                    nll_loss = row_nll.mean()
                    loss = nll_loss + self.kl_factor * kl_loss + self.v_weight_decay * decay_loss
                    nll = float(nll_loss.detach())
                else:
                    nll_sum = torch.zeros(1, dtype=torch.float64, device=device)
                    if n_local:
                        nll_sum += row_nll.detach().double().sum()
                        local_loss = row_nll.sum() / n_rewrite
                    if kl_row is not None:
                        kl_part = self.kl_factor * kl_loss
                        local_loss = kl_part if local_loss is None else local_loss + kl_part
                    nll = float(split.all_reduce_sum_(nll_sum)) / n_rewrite
                if step == 0:
                    nll_init = nll
                if nll < self.early_stop_loss or step == self.v_num_grad_steps:
                    break
                if not split.active:
                    loss.backward()
                else:
                    if local_loss is None and split.even:  # padding only: the others' backward, adding nothing
                        hidden = out.logits if use_logits else captured["hidden"]
                        local_loss = hidden.sum() * 0.0
                    if local_loss is not None:
                        local_loss.backward()
                    grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
                    delta.grad = split.all_reduce_sum_(grad)
                    (self.v_weight_decay * decay_loss).backward()  # the same on every rank: added after the sum
                optimizer.step()
                steps += 1
                with torch.no_grad():
                    max_norm = self.clamp_norm_factor * h_norm
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
        return delta.detach(), nll_init, nll, steps

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _encode(self, tokenizer, template: str, prompt: str, subject: str) -> tuple[list[int], int]:
        """Token ids of ``template`` around the rendered ``prompt``, and the index of the fact token."""
        text, subject_end = _render(template, prompt, subject)
        ids = list(tokenizer(text)["input_ids"])
        if self.fact_token == "last":
            return ids, len(ids) - 1
        prefix = tokenizer(text[:subject_end])["input_ids"]
        return ids, min(len(prefix), len(ids)) - 1

    def _solve_mom2(self, key: torch.Tensor) -> torch.Tensor:
        """``C^{-1} k*`` in float64 (``k*`` itself when ``mom2_adjustment`` is off)."""
        if self._mom2_lu is None:
            return key.double()
        lu, pivots = self._mom2_lu
        x = key.to(device=lu.device, dtype=torch.float64)[:, None]
        return torch.linalg.lu_solve(lu, pivots, x)[:, 0].to(key.device)

    def _module_name(self, model: nn.Module) -> str:
        return (self.module_template or mlp_out_template(model)).format(self.layer)

    def _layer_name(self, model: nn.Module, layer: int) -> str:
        return (self.layer_module_template or layer_template(model)).format(layer)

    def _loss_layer(self, model: nn.Module) -> int:
        if self.v_loss_layer is not None:
            return int(self.v_loss_layer)
        num_layers = _num_layers(model)
        if num_layers is None:
            raise ValueError("Cannot tell the number of layers of this model; give v_loss_layer explicitly")
        return num_layers - 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer}, fact_token={self.fact_token!r}, "
            f"v_num_grad_steps={self.v_num_grad_steps}, v_lr={self.v_lr}, mom2_adjustment={self.mom2_adjustment})"
        )


# --------------------------------------------------------------------------------------------------------------------
# module-level helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"A context template needs exactly one '{{}}' where the prompt goes, got {template!r}")
    return template


def _render(template: str, prompt: str, subject: str) -> tuple[str, int]:
    """``template.format(prompt.format(subject))`` and the character offset just past the subject in it."""
    marked_prompt = prompt.format("\0")
    subject_start = marked_prompt.index("\0")
    rendered = marked_prompt.replace("\0", subject)
    marked = template.format("\0")
    prompt_start = marked.index("\0")
    text = marked.replace("\0", rendered)
    return text, prompt_start + subject_start + len(subject)


def _target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """The token ids of ``" " + target`` as they follow ``prompt``.

    Read off the tokenization of ``prompt + " " + target`` where that starts with the prompt's own tokens, so that
    tokenizers which fold the space into the next piece (SentencePiece's ``"▁Paris"``) give the ids the model sees
    in running text; otherwise ``" " + target`` on its own.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full_ids = list(tokenizer(prompt + " " + target)["input_ids"])
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    return list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])


def _linear(module: nn.Module, key: torch.Tensor) -> torch.Tensor:
    """The module's linear map without bias, ``W k``, in float32 (``k @ weight`` for ``Conv1D``)."""
    weight = full_weight(module.weight).float()  # a sharded weight: gathered (every rank computes the same W k)
    key = key.to(device=weight.device, dtype=torch.float32)
    return key @ weight if is_transposed(module) else weight @ key


def _num_layers(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    value = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return int(value) if value else None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    value = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not value:
        raise ValueError("Cannot tell the hidden size of this model from its config")
    return int(value)


def _logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits read from an intermediate layer: final norm, then the LM head (for ``v_loss_layer`` < last)."""
    base = getattr(model, "base_model", model)
    for attr in ("ln_f", "norm", "final_layer_norm"):
        norm = getattr(base, attr, None)
        if isinstance(norm, nn.Module):
            return model.get_output_embeddings()(norm(hidden))
    raise ValueError("Cannot find the final norm of this model to read logits from v_loss_layer; use the last layer")


@contextlib.contextmanager
def _hooks(*handles) -> Iterator[None]:
    """Removes the given hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _prepared(model: nn.Module, freeze: bool = False) -> Iterator[None]:
    """Eval mode (no dropout) and, with ``freeze``, no gradients for the parameters; both restored on exit."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()} if freeze else {}
    model.eval()
    try:
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.training = flag


def _generate_context_templates(
    model: nn.Module, tokenizer, lengths: Sequence[tuple[int, int]], seed: int
) -> list[str]:
    """Short texts sampled from the model (seeded top-k), each turned into ``"<text>. {}"``.

    For each ``(length, count)`` pair, ``count`` texts of ``length`` new tokens, their openings cycling through
    "The", "Therefore", "Because", "I", "You". Sampling uses a CPU ``torch.Generator`` seeded with ``seed``, so the
    templates depend only on the model, the tokenizer and the seed.
    """
    generator = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    templates: list[str] = []
    with _prepared(model), torch.no_grad():
        for length, count in lengths:
            for p, prefix in enumerate(_TEMPLATE_PREFIXES):
                n = len(range(p, count, len(_TEMPLATE_PREFIXES)))
                if n == 0:
                    continue
                ids = torch.tensor([tokenizer(prefix)["input_ids"]] * n, device=device)
                for _ in range(length):
                    logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
                    top = torch.topk(logits, k=min(_TEMPLATE_TOP_K, logits.shape[-1]), dim=-1)
                    probs = torch.softmax(top.values, dim=-1).cpu()
                    choice = torch.multinomial(probs, 1, generator=generator)
                    next_ids = top.indices.cpu().gather(1, choice).to(device)
                    ids = torch.cat([ids, next_ids], dim=1)
                for row in ids.tolist():
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates
