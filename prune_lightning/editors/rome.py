r"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

The idea. ROME reads the out-projection ``W`` of one mid-layer MLP as a linear key-value memory: the MLP's hidden
activation at the last token of a subject ("Danielle Darrieux") is a *key* ``k``, and ``W k`` is the *value* written
into the residual stream, which later layers turn into the facts about that subject. To change one fact
(``"The mother tongue of Danielle Darrieux is" -> "English"``) ROME finds the key of the subject, a value that makes
the model say the new object, and writes the association into ``W`` with the smallest update that keeps the other
keys' values as they were.

1. The key ``k*`` (:func:`~.value.compute_key`): the input of ``W`` at the subject's last token, averaged over the
   prompt prefixed by each context template (the plain prompt and 20 short generated texts)::

       k* = mean over templates c of  input_of_W( c + prompt(subject) )[subject's last token]

2. The value (:func:`~.value.optimize_value`): a vector ``delta`` added to the output of the edited MLP at the
   subject's last token, in every templated prompt, fitted with Adam so the model continues each prompt with the
   new target, while the KL term keeps what the model thinks the subject is and a decay keeps ``delta`` small::

       L(delta) = target NLL + kl_factor * KL(edited || original) + v_weight_decay * ||delta|| / ||h||^2

   ``h`` is the MLP's original output at that token in the plain prompt; ``||delta|| <= clamp_norm_factor * ||h||``.

3. The update. In ``(out, in)`` terms the rank-one matrix::

       dW = (h + delta - W k - b) (C^{-1} k*)^T / (k^T C^{-1} k*)

   where ``k`` is the key of the *plain* prompt alone, ``W k + b`` the MLP's output there, and ``C = E[k k^T]`` the
   second moment of the keys over a text corpus (:mod:`prune_lightning.stats`). Check: ``(W + dW) k = h + delta -
   b``, the optimised value; a key ``x`` with ``x^T C^{-1} k* = 0`` keeps its value. With ``mom2_adjustment=False``,
   ``C`` is the identity. In the plain prompt ``h = W k + b``, so the residual is ``delta`` up to float rounding.

Conventions, as in the authors' code (``kmeng01/rome``: ``rome/compute_u.py`` for the key and ``C^{-1} k*``,
``rome/compute_v.py`` for the value and the denominator ``k . C^{-1} k*``, ``rome/rome_main.py`` for the templates);
the shared ones are listed in :mod:`.value`. Two of them can be changed, both off by default:

- ``delta_site="block"`` adds ``delta`` to the whole block's output (as MEMIT does) instead of the MLP's; the
  clamp and the decay then use the block output's norm, and the residual is ``delta`` itself.
- ``closed_form_key="averaged"`` uses ``k*`` in the denominator as well, so that ``(W + dW) k* = W k* + residual``
  holds exactly at the averaged key rather than at the plain prompt's key.

For LLaMA the PRUNE paper used EasyEdit's ROME (``easyeditor/models/rome``), whose presets here open the generated
templates with "The", "Therefore", ... (``template_prompts="prefixes"``) and set ``mom2_adjustment=False``.

A batch of requests is edited one after another: each request's update is written into the weight temporarily so the
next one sees it, the original weight is restored before returning, and the factors are concatenated (rank <= batch
size). :meth:`ROME.compute_update` therefore leaves the model as it found it; the caller writes the returned
:class:`~prune_lightning.editors.base.LowRankUpdate`.

Several processes. Inside :func:`~prune_lightning.distributed.split_work` (``SequentialEditor`` on several processes)
the rows of steps 1 and 2 are spread over the ranks (see :mod:`.value`), so every rank computes the same key and
``delta`` as one process would, to float tolerance, with a share of the work.

Hyperparameters default to the paper's GPT-2 XL setting; :data:`ROME_PRESETS` and :meth:`ROME.preset` hold the
published ones per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.editors.base import LowRankUpdate, Update
from prune_lightning.editors.templates import (FACT_TOKENS, TEMPLATE_PROMPTS, TemplatedEditor, check_templates,
                                               generate_context_templates, template_groups)
from prune_lightning.editors.value import ValueSettings, compute_key, fact_representations, optimize_value
from prune_lightning.models import (full_weight, get_module, is_sharded_model, layer_template, linear_weight_names,
                                    mlp_out_template, num_layers, rank_one_in_layout, write_weight)
from prune_lightning.stats import REFERENCE_CORPUS, second_moment

__all__ = ["ROME", "ROME_PRESETS", "ROMETrace"]

# The published hyperparameters: ROME's GPT-2 XL setting (kmeng01/rome hparams/ROME/gpt2-xl.json); EasyEdit's LLaMA
# settings (hparams/ROME/llama-7b.yaml, llama3-8b.yaml), which the PRUNE paper used.
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
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((5, 10), (10, 10)),
        template_prompts="eos",
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
        mom2_corpus=REFERENCE_CORPUS,
        mom2_n_samples=100000,
        mom2_dtype="float32",
        context_template_lengths=((5, 10), (10, 10)),
        template_prompts="prefixes",
    ),
}
# LLaMA-3-8B: EasyEdit's llama3-8b.yaml holds the same values as its LLaMA-2-7B one.
ROME_PRESETS["llama3-8b"] = dict(ROME_PRESETS["llama2-7b"])

_CLOSED_FORM_KEYS = ("plain", "averaged")


@dataclass
class ROMETrace:
    """What ROME computed for one request (for logging and inspection; see ``ROME.last_trace``).

    Args:
        case_id: The request's ``case_id``.
        key: ``k*``, the key averaged over the context templates (input space, float32).
        key_plain: ``k``, the key of the plain prompt alone (input space, float32).
        target: ``h + delta``, what the site (the MLP, or the block) should output at the fact token.
        residual: What the update adds to the module's output at ``key_plain`` (output space, float32).
        delta: The optimised change of the site's output.
        nll_init: Mean NLL of the target before the optimisation.
        nll_final: Mean NLL of the target with ``delta`` added.
        loss_init: Total loss (NLL, KL and decay) before the optimisation.
        loss_final: Total loss with ``delta`` added.
        steps: Adam steps taken.
    """

    case_id: Union[int, str]
    key: torch.Tensor
    key_plain: torch.Tensor
    target: torch.Tensor
    residual: torch.Tensor
    delta: torch.Tensor
    nll_init: float
    nll_final: float
    loss_init: float
    loss_final: float
    steps: int


class ROME(TemplatedEditor):
    """Rank-One Model Editing: one rank-one update of an MLP out-projection per request.

    Args:
        layer: Index of the layer whose MLP out-projection is edited.
        module_template: Name template of the edited module (default by model type, e.g.
            ``transformer.h.{}.mlp.c_proj`` for GPT-2, ``model.layers.{}.mlp.down_proj`` for LLaMA).
        layer_module_template: Name template of a transformer block (default by model type, e.g.
            ``transformer.h.{}``): the loss layer's, and the site of ``delta`` with ``delta_site="block"``.
        fact_token: Where the key is read: ``"subject_last"`` (the subject's last token) or ``"last"`` (the
            prompt's last token).
        v_num_grad_steps: Times round the value optimisation's loop; the last one only evaluates the loss, so at
            most ``v_num_grad_steps - 1`` Adam steps (as in the authors' code).
        v_lr: Adam learning rate of the value optimisation.
        v_loss_layer: Layer whose output gives the target NLL (default: the last layer, i.e. the model's logits); a
            layer below ``layer`` means ``layer``, as in the authors' code.
        v_weight_decay: Weight of ``||delta|| / ||h||^2`` in the loss.
        clamp_norm_factor: ``||delta||`` is clamped to this multiple of ``||h||`` after every step.
        kl_factor: Weight of ``KL(edited || original)`` on the ``"{subject} is a"`` prompt.
        early_stop_loss: Stop the optimisation once the total loss is below this.
        mom2_adjustment: Shape the update by the keys' second moment ``C`` (False: ``C`` is the identity).
        mom2_corpus: Corpus for ``C``: hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` file
            (default: Wikipedia, as in the authors' code).
        mom2_n_samples: Number of corpus documents ``C`` is computed over.
        mom2_dtype: Accumulation dtype of ``C`` (``"float32"`` or ``"float64"``).
        stats_file: Precomputed ``C`` (safetensors, ``.npy`` or the authors' ``.npz``) instead of computing it.
        context_templates: Explicit context templates (each with one ``{}`` where the prompt goes), used as given;
            the first one is where ``h`` is read, so it is normally ``"{}"``. Default: ``"{}"`` and templates
            generated from the model in :meth:`setup`.
        context_template_lengths: ``(length, count)`` pairs of generated templates: ``count`` texts of ``length``
            tokens in all, their opening included.
        template_prompts: How generated templates open: ``"eos"`` (the end-of-text token, ROME's GPT-2 code) or
            ``"prefixes"`` ("The", "Therefore", "Because", "I", "You"; EasyEdit's ROME, MEMIT).
        delta_site: Where ``delta`` is added: ``"module"`` (the edited MLP's output, the authors' code) or
            ``"block"`` (the block's output).
        closed_form_key: The key in the denominator of the closed form: ``"plain"`` (the plain prompt's, the
            authors' code) or ``"averaged"`` (``k*``).
        seed: Seed of the template generation.
        reuse_prefix: Run the layers below the one ``delta`` is added to once per request, not in every round of the
            value optimisation (they do not depend on ``delta``; the authors' code reruns them). Same result.
        logits_subset: Compute the logits only where the value loss reads them (the authors' code computes all).
            Same result.
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
        mom2_corpus: str = REFERENCE_CORPUS,
        mom2_n_samples: int = 100000,
        mom2_dtype: str = "float32",
        stats_file: Optional[str] = None,
        context_templates: Optional[list[str]] = None,
        context_template_lengths: tuple = ((5, 10), (10, 10)),
        template_prompts: str = "eos",
        delta_site: str = "module",
        closed_form_key: str = "plain",
        seed: int = 0,
        reuse_prefix: bool = True,
        logits_subset: bool = True,
    ) -> None:
        if fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {layer!r}")
        if template_prompts not in TEMPLATE_PROMPTS:
            raise ValueError(f"template_prompts must be one of {TEMPLATE_PROMPTS}, got {template_prompts!r}")
        if closed_form_key not in _CLOSED_FORM_KEYS:
            raise ValueError(f"closed_form_key must be one of {_CLOSED_FORM_KEYS}, got {closed_form_key!r}")
        lengths = tuple((int(length), int(count)) for length, count in context_template_lengths)
        if any(length < 1 or count < 0 for length, count in lengths):
            raise ValueError(f"context_template_lengths must hold (length >= 1, count >= 0) pairs, got {lengths}")
        if context_templates is not None:
            check_templates(context_templates)
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
        self.template_prompts = template_prompts
        self.delta_site = delta_site
        self.closed_form_key = closed_form_key
        self.seed = int(seed)
        self.reuse_prefix = bool(reuse_prefix)
        self.logits_subset = bool(logits_subset)
        self._given_templates = context_templates
        self.context_templates: Optional[list[str]] = None
        self.context_template_groups: list[list[str]] = []
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
        n_layers = num_layers(model)
        if n_layers is not None and not 0 <= loss_layer < n_layers:
            raise ValueError(f"v_loss_layer={loss_layer} is out of range for a model with {n_layers} layers")
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
            groups = template_groups(self._given_templates, plain_alone=False)
        else:
            generated = generate_context_templates(model, tokenizer, self.context_template_lengths, self.seed,
                                                   prompts=self.template_prompts)
            groups = [["{}"] + generated]  # compute_u.py: one average over all templates
        self.context_template_groups = groups
        self.context_templates = [t for group in groups for t in group]

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
        n = len(traces)
        self.last_metrics = {
            "loss": sum(t.nll_final for t in traces) / n,
            "loss_init": sum(t.nll_init for t in traces) / n,
            "v_loss": sum(t.loss_final for t in traces) / n,
            "v_steps": sum(t.steps for t in traces) / n,
            "delta_norm": sum(float(t.delta.norm()) for t in traces) / n,
        }
        return {param_name: LowRankUpdate(torch.cat(lefts, dim=1), torch.cat(rights, dim=1))}

    # ------------------------------------------------------------------------------------------------------------
    # one request
    # ------------------------------------------------------------------------------------------------------------

    def _edit_one(
        self, model: nn.Module, tokenizer, module: nn.Module, request
    ) -> tuple[torch.Tensor, torch.Tensor, ROMETrace]:
        """The rank-one factors ``(left, right)`` (parameter layout) for one request, and what led to them."""
        key = compute_key(model, tokenizer, module, request, self.context_template_groups, self.fact_token)  # k*
        site = module if self.delta_site == "module" else get_module(model, self._layer_name(model, self.layer))
        loss_layer = self._loss_layer(model)
        loss_block = None
        n_layers = num_layers(model)
        if n_layers is None or loss_layer != n_layers - 1:
            if is_sharded_model(model):
                raise NotImplementedError(
                    f"ROME with v_loss_layer={loss_layer} below the last layer on a sharded (FSDP) model: the final "
                    "norm and head would run outside the model's forward, on sharded weights. Use the last layer "
                    "(the presets do)."
                )
            loss_block = get_module(model, self._layer_name(model, loss_layer))
        prefix = [get_module(model, self._layer_name(model, i)) for i in range(self.layer)]  # do not see delta
        value = optimize_value(model, tokenizer, request, site, self.context_templates, self.value_settings,
                               fact_token=self.fact_token, loss_block=loss_block, prefix=prefix)
        key_plain, out_plain = fact_representations(model, tokenizer, module, [request], self.fact_token, "both")
        key_plain, out_plain = key_plain[0], out_plain[0]
        # compute_v.py: (target - cur_output) / (cur_input . C^-1 k*); with delta at the block, delta itself.
        residual = value.target.to(out_plain.device) - out_plain if self.delta_site == "module" else value.delta
        key_direction = self._solve_mom2(key)  # C^{-1} k*
        denominator_key = key_plain if self.closed_form_key == "plain" else key
        denominator = torch.dot(denominator_key.double().to(key_direction.device), key_direction)
        value_vec = residual.double().to(key_direction.device) / denominator
        weight = module.weight
        out_dtype = weight.dtype if torch.finfo(weight.dtype).bits > 32 else torch.float32
        left, right = rank_one_in_layout(
            module, value_vec.to(device=weight.device, dtype=out_dtype), key_direction.to(weight.device, out_dtype)
        )
        trace = ROMETrace(
            case_id=request.case_id,
            key=key.detach().cpu(),
            key_plain=key_plain.detach().cpu(),
            target=value.target.detach().cpu(),
            residual=residual.detach().float().cpu(),
            delta=value.delta.detach().cpu(),
            nll_init=value.nll_init,
            nll_final=value.nll,
            loss_init=value.loss_init,
            loss_final=value.loss,
            steps=value.steps,
        )
        return left, right, trace

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

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
            return max(int(self.v_loss_layer), self.layer)  # compute_v.py: max(v_loss_layer, layer)
        n_layers = num_layers(model)
        if n_layers is None:
            raise ValueError("Cannot tell the number of layers of this model; give v_loss_layer explicitly")
        return n_layers - 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer}, fact_token={self.fact_token!r}, "
            f"v_num_grad_steps={self.v_num_grad_steps}, v_lr={self.v_lr}, mom2_adjustment={self.mom2_adjustment})"
        )
