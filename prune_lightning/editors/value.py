r"""What the key-value editors share: keys, and the optimisation of the value.

ROME, MEMIT and AlphaEdit read an MLP out-projection ``W`` as a linear key-value memory. Each of them needs, for a
request ``"The mother tongue of {} is" / "Danielle Darrieux" -> "English"``:

1. **Context templates**: short texts that the prompt is appended to (``"I like it. {}"``), so that the key and
   the value do not depend on one exact wording (:mod:`.templates`).
2. **The key** ``k*``: the input of ``W`` at the *fact token* (the subject's last token, or the prompt's last one),
   averaged over the templated prompts (:func:`compute_key`).
3. **The value**: a vector ``delta`` added to an output at the fact token, fitted with Adam until the model says
   the new target (:func:`optimize_value`). ROME writes ``delta`` into ``W`` at once; MEMIT spreads it over several
   layers.

They live here and in :mod:`.templates`, once, so that every editor computes them the same way; the editors own
only their closed forms. Everything below follows the authors' code by default, so that the published hyperparameters mean what they
meant in the papers. The references are ``kmeng01/rome`` (``rome/compute_u.py``, ``rome/compute_v.py``,
``rome/rome_main.py``, ``rome/repr_tools.py``), ``kmeng01/memit`` (``memit/compute_z.py``,
``memit/compute_ks.py``, ``memit/memit_main.py``) and, for LLaMA, ``zjunlp/EasyEdit``
(``easyeditor/models/rome/compute_v.py``, ``easyeditor/models/memit/compute_z.py``), which the PRUNE paper used.

The value optimisation (``compute_v.py``, ``compute_z.py``). One batch holds every templated prompt followed by
the target's tokens but the last (teacher forcing), plus the prompt ``"{subject} is a"``. At every row's fact token
``delta`` is added to the output of the *site*: ROME's reference adds it to the output of the edited MLP (for GPT-2
and LLaMA that is the output of the edited projection itself, ``site="module"``); MEMIT's adds it to the output of
the whole block (``site="block"``). With ``h`` the site's original output at the fact token of the first template
(the plain prompt), the loss is::

    L(delta) = mean over templates  -1/|y| sum_i log p(y_i | template + prompt, y_<i ; delta)      target NLL
             + kl_factor       * KL( p(. | "{subject} is a" ; delta) || p(. | "{subject} is a") )  edited || original
             + v_weight_decay  * ||delta|| / ||h||^2                                             not squared

The KL is read at the KL prompt's fact token. The loop runs ``v_num_grad_steps`` times: each time it computes the
loss, stops if the *total* loss is below ``early_stop_loss`` (0.05) or if this is the last time round, and otherwise
takes one Adam step and then clamps ``||delta|| <= clamp_norm_factor * ||h||``. So ``v_num_grad_steps=20`` takes at
most 19 Adam steps, as the reference does.

Target tokens: :func:`prune_lightning.tokens.continuation_ids`, the same definition as the edit metrics use. On
SentencePiece tokenizers (LLaMA-2) this differs from EasyEdit, which keeps a lone ``"▁"`` before the target.

Several processes. Inside :func:`~prune_lightning.distributed.split_work` the rows of one request (one per
template, plus the KL prompt) are dealt out over the ranks; keys are weighted sums all-reduced, and in the value
optimisation each rank back-propagates its rows' part of the loss, the gradients and the loss terms are
all-reduced, and every rank takes the same Adam step, so every rank ends with the single-process ``delta`` to float
tolerance. On a sharded model (``even``) every rank runs as many rows, padding with rows outside the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.distributed import current_split
from prune_lightning.editors.templates import encode
from prune_lightning.models import (eval_mode, hidden_size, input_dim, is_sharded_model, logits_at_supported,
                                    logits_from_hidden, model_device, output_dim, removing_hooks)
from prune_lightning.tokens import continuation_ids, pad_id, pad_right

__all__ = [
    "KL_PROMPT",
    "SITES",
    "ValueResult",
    "ValueSettings",
    "compute_key",
    "fact_representations",
    "optimize_value",
]

SITES = ("module", "block")
#: The prompt whose next-token distribution the KL term keeps: what the model thinks the subject *is*.
KL_PROMPT = "{} is a"


# --------------------------------------------------------------------------------------------------------------------
# keys and representations
# --------------------------------------------------------------------------------------------------------------------


def compute_key(
    model: nn.Module, tokenizer, module: nn.Module, request, groups: Sequence[Sequence[str]], fact_token: str
) -> torch.Tensor:
    """``k*``: the input of ``module`` at the fact token, averaged within each template group, then over groups.

    Returns a float32 vector on the module's device. Under :func:`~prune_lightning.distributed.split_work` each rank
    runs its share of the templated prompts and the weighted sums are all-reduced.

    Args:
        model: The model (not modified).
        tokenizer: Its tokenizer.
        module: The linear module whose input is the key.
        request: An ``EditRequest`` (``prompt``, ``subject``).
        groups: Template groups (:func:`template_groups`).
        fact_token: ``"subject_last"`` or ``"last"``.
    """
    split = current_split()
    flat = [t for group in groups for t in group]
    weights = [1.0 / (len(groups) * len(group)) for group in groups for _ in group]
    mine = split.rows(len(flat))
    templates = [flat[i] for i in mine]
    # An even split (sharded model): padding rows (the first template again) up to every rank's count, not summed.
    templates += [flat[0]] * (split.padded_rows(len(flat)) - len(mine))
    total = torch.zeros(input_dim(module), dtype=torch.float32, device=module.weight.device)
    if templates:
        encoded = [encode(tokenizer, t, request.prompt, request.subject, fact_token) for t in templates]
        keys = _capture(model, tokenizer, module, encoded, track="in")[: len(mine)]
        row_weights = torch.tensor([weights[i] for i in mine], dtype=torch.float32, device=keys.device)
        total = (row_weights[:, None] * keys).sum(dim=0).to(total.device)
    return split.all_reduce_sum_(total) if split.active else total


def fact_representations(
    model: nn.Module, tokenizer, module: nn.Module, requests: Sequence, fact_token: str, track: str = "out"
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The input or output (or both) of ``module`` at each request's fact token, in its plain prompt (no template).

    Returns float32 ``(len(requests), dim)`` tensors: one for ``track="in"`` or ``"out"``, a pair ``(inputs,
    outputs)`` for ``"both"``. Every rank computes all of them.

    Args:
        model: The model (not modified).
        tokenizer: Its tokenizer.
        module: Any module of the model: a linear map (keys are its inputs) or a block (its output is hidden states).
        requests: ``EditRequest`` objects.
        fact_token: ``"subject_last"`` or ``"last"``.
        track: ``"in"``, ``"out"`` or ``"both"``.
    """
    encoded = [encode(tokenizer, "{}", r.prompt, r.subject, fact_token) for r in requests]
    return _capture(model, tokenizer, module, encoded, track=track)


class _StopForward(Exception):
    """Raised by a hook once what it needs is captured: the layers above are not needed."""


def _capture(model: nn.Module, tokenizer, module: nn.Module, encoded: Sequence[tuple[list[int], int]], track: str):
    """One no-grad forward of the right-padded rows; ``module``'s input and/or output at each row's index."""
    if track not in ("in", "out", "both"):
        raise ValueError(f"track must be 'in', 'out' or 'both', got {track!r}")
    device = model_device(model)
    input_ids, attention_mask = pad_right([ids for ids, _ in encoded], pad_id(tokenizer), device)
    rows = torch.arange(len(encoded))
    cols = torch.tensor([idx for _, idx in encoded])
    captured: dict[str, torch.Tensor] = {}
    # Stopping the forward early skips the layers above; a sharded model's forward is a collective, so it runs whole.
    stop = not is_sharded_model(model)

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor[0] if isinstance(tensor, tuple) else tensor
        return tensor[rows.to(tensor.device), cols.to(tensor.device)].detach().float()

    def capture(_module, args, output):
        if track in ("in", "both"):
            captured["in"] = pick(args[0])
        if track in ("out", "both"):
            captured["out"] = pick(output)
        if stop:
            raise _StopForward

    with eval_mode(model), removing_hooks(module.register_forward_hook(capture)), torch.no_grad():
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError(f"The forward pass never reached {type(module).__name__}")
    if track == "both":
        return captured["in"], captured["out"]
    return captured[track]


# --------------------------------------------------------------------------------------------------------------------
# the value optimisation
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueSettings:
    """The settings of :func:`optimize_value` (the ``v_*`` hyperparameters of ROME and MEMIT).

    Args:
        num_grad_steps: Times round the loop; the last one only evaluates, so at most ``num_grad_steps - 1`` Adam
            steps (the reference's ``v_num_grad_steps``).
        lr: Adam's learning rate.
        weight_decay: Weight of ``||delta|| / ||h||^2``.
        clamp_norm_factor: ``||delta|| <= clamp_norm_factor * ||h||`` after every step.
        kl_factor: Weight of ``KL(edited || original)`` on ``"{subject} is a"``.
        early_stop_loss: Stop once the total loss is below this.
        site: Where ``delta`` is added: ``"module"`` (the edited projection's output, ROME) or ``"block"`` (the
            block's output, MEMIT).
        reuse_prefix: Run the blocks below the site once, in the first round, and reuse their outputs in the others
            (they do not depend on ``delta``); ``False`` runs the whole model every round, as the authors' code does.
            The result is the same to float rounding.
        logits_subset: Apply the final norm and the head only at the positions the loss reads (the target tokens
            and the KL prompt's fact token); ``False`` computes every position's logits, as the authors' code does.
            The result is the same to float rounding.
    """

    num_grad_steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    site: str = "module"
    reuse_prefix: bool = True
    logits_subset: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_grad_steps, bool) or not isinstance(self.num_grad_steps, int) or self.num_grad_steps < 1:
            raise ValueError(
                f"v_num_grad_steps must be an int >= 1 (the loop count: it takes at most v_num_grad_steps - 1 Adam "
                f"steps), got {self.num_grad_steps!r}"
            )
        for name in ("lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{_public(name)} must be positive, got {value!r}")
        for name in ("weight_decay", "kl_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_public(name)} must be >= 0, got {value!r}")
        if math.isnan(self.early_stop_loss) or self.early_stop_loss == math.inf:
            raise ValueError(f"early_stop_loss must be a number below inf (-inf: never stop early), got "
                             f"{self.early_stop_loss!r}")
        if self.site not in SITES:
            raise ValueError(f"delta site must be one of {SITES}, got {self.site!r}")


def _public(name: str) -> str:
    return name if name == "clamp_norm_factor" else f"v_{name}"


@dataclass
class ValueResult:
    """What :func:`optimize_value` found for one request.

    Args:
        delta: The optimised change of the site's output at the fact token (float32).
        init: ``h``, the site's original output at the fact token of the first template (float32).
        nll_init: Mean target NLL with ``delta = 0``.
        nll: Mean target NLL with the final ``delta``.
        loss_init: Total loss with ``delta = 0``.
        loss: Total loss with the final ``delta``.
        steps: Adam steps taken.
    """

    delta: torch.Tensor
    init: torch.Tensor
    nll_init: float
    nll: float
    loss_init: float
    loss: float
    steps: int

    @property
    def target(self) -> torch.Tensor:
        """``h + delta``: what the site should output at the fact token."""
        return self.init + self.delta


def optimize_value(
    model: nn.Module,
    tokenizer,
    request,
    site: nn.Module,
    templates: Sequence[str],
    settings: ValueSettings,
    fact_token: str = "subject_last",
    loss_block: Optional[nn.Module] = None,
    prefix: Sequence[nn.Module] = (),
) -> ValueResult:
    """Fits ``delta``, added to ``site``'s output at the fact tokens, so that the model says ``request.target_new``.

    See the module docstring for the loss and the loop. The model's weights are not changed.

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        request: An ``EditRequest`` (``prompt``, ``subject``, ``target_new``, ``rendered_prompt``, ``case_id``).
        site: The module whose output ``delta`` is added to (the edited projection, or its block).
        templates: The context templates, flat, the plain ``"{}"`` first (``h`` is read in the first one).
        settings: The hyperparameters.
        fact_token: ``"subject_last"`` or ``"last"``.
        loss_block: A block whose output gives the target NLL through the final norm and the head (the logit lens,
            for a loss layer below the last); ``None`` reads the model's logits.
        prefix: The blocks below the site's block, in order: with ``settings.reuse_prefix`` they run only in the
            first round.
    """
    split = current_split()
    device = model_device(model)
    target_ids = continuation_ids(tokenizer, request.target_new, request.rendered_prompt)
    templates = list(templates)

    # Rows 0..n-1: each template + prompt + target[:-1]; row n: the KL prompt. This rank's rows keep that order.
    n_rewrite = len(templates)
    mine = split.rows(n_rewrite + 1)
    seqs, lookup, target_pos = [], [], []
    for row in (r for r in mine if r < n_rewrite):
        ids, idx = encode(tokenizer, templates[row], request.prompt, request.subject, fact_token)
        seqs.append(ids + target_ids[:-1])
        lookup.append(idx)
        target_pos.append([len(ids) - 1 + i for i in range(len(target_ids))])
    n_local = len(target_pos)
    kl_row: Optional[int] = None
    kl_idx = 0
    if n_rewrite in mine:
        kl_ids, kl_idx = encode(tokenizer, "{}", KL_PROMPT, request.subject, fact_token)
        kl_row = len(seqs)
        seqs.append(kl_ids)
        lookup.append(kl_idx)
    owns_first = bool(mine) and mine[0] == 0
    n_padding = split.padded_rows(n_rewrite + 1) - len(seqs)
    if n_padding:  # an even split: rows outside the loss, so that every rank runs the same forward and backward
        padding_ids, padding_idx = encode(tokenizer, templates[0], request.prompt, request.subject, fact_token)
        seqs += [padding_ids + target_ids[:-1]] * n_padding
        lookup += [padding_idx] * n_padding

    if seqs:
        input_ids, attention_mask = pad_right(seqs, pad_id(tokenizer), device)
        rows = torch.arange(len(seqs), device=device)
        cols = torch.tensor(lookup, device=device)
    # The positions the loss reads: every local rewrite row's target positions, then the KL prompt's fact token.
    read_rows = [r for r in range(n_local) for _ in target_ids] + ([kl_row] if kl_row is not None else [])
    read_cols = [c for pos in target_pos for c in pos] + ([kl_idx] if kl_row is not None else [])
    read_rows_t = torch.tensor(read_rows, dtype=torch.long, device=device)
    read_cols_t = torch.tensor(read_cols, dtype=torch.long, device=device)
    n_target_reads = n_local * len(target_ids)
    if n_local:
        tgt_ids = torch.tensor(target_ids, device=device)[None, :].expand(n_local, -1)
    sharded = is_sharded_model(model)  # the root's forward must run whole: its hooks gather the shards
    head = "lens" if loss_block is not None else (
        "subset" if settings.logits_subset and not sharded and logits_at_supported(model) else "full")

    state: dict[str, torch.Tensor] = {}

    def add_delta(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if "delta" not in state:  # the first forward: delta has the site's width
            state["delta"] = torch.zeros(hidden.shape[-1], dtype=torch.float32, device=hidden.device,
                                         requires_grad=True)
        if "init" not in state and owns_first:  # the site's original output at the first template's fact token
            state["init"] = hidden[0, cols[0]].detach().float()
        picked = hidden[rows, cols] + state["delta"].to(hidden.dtype)
        hidden = hidden.index_put((rows, cols), picked)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    captured: dict[str, torch.Tensor] = {}

    def capture_hidden(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handles = [site.register_forward_hook(add_delta)]
    if loss_block is not None:
        handles.append(loss_block.register_forward_hook(capture_hidden))
    if not seqs:  # more ranks than rows: this one only joins the sums; delta needs its width without a forward
        width = hidden_size(model) if settings.site == "block" else output_dim(site)
        state["delta"] = torch.zeros(width, dtype=torch.float32, device=device, requires_grad=True)

    optimizer: Optional[torch.optim.Optimizer] = None
    kl_init: Optional[torch.Tensor] = None
    nll_init = loss_init = nll = loss_value = math.nan
    steps = 0
    reuse = _PrefixReuse(prefix if settings.reuse_prefix and seqs and not sharded else ())
    with eval_mode(model, freeze=True), removing_hooks(*handles), reuse:
        for it in range(settings.num_grad_steps):
            if optimizer is not None:
                optimizer.zero_grad()
            if seqs:
                if head == "subset":
                    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
                    graph = hidden
                    read = model.get_output_embeddings()(hidden[read_rows_t, read_cols_t])
                else:
                    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    graph = out.logits
                    read = (out.logits[read_rows_t, read_cols_t] if head == "full"
                            else logits_from_hidden(model, captured["hidden"][read_rows_t, read_cols_t]))
                reuse.replay()  # from the second round on, the blocks below the site return their first outputs
            delta = state["delta"]
            if optimizer is None:
                optimizer = torch.optim.Adam([delta], lr=settings.lr)
            if it == 0 and split.active:  # h is read on the rank that owns the first template
                init = state.get("init")
                state["init"] = split.broadcast_(
                    init if init is not None else torch.zeros(delta.shape[0], dtype=torch.float32, device=device)
                )
            init_norm = state["init"].norm()

            local_loss: Optional[torch.Tensor] = None  # this rank's rows' part of the NLL and KL terms
            nll_sum = kl_value = None
            if n_local:
                log_probs = torch.log_softmax(read[:n_target_reads].float(), dim=-1).view(n_local, len(target_ids), -1)
                row_nll = -log_probs.gather(-1, tgt_ids[..., None]).squeeze(-1).mean(dim=1)
                nll_sum = row_nll.sum()
                local_loss = nll_sum / n_rewrite
            if kl_row is not None:
                kl_log_probs = torch.log_softmax(read[n_target_reads].float(), dim=-1)
                if kl_init is None:
                    kl_init = kl_log_probs.detach()
                kl_value = torch.sum(kl_log_probs.exp() * (kl_log_probs - kl_init))  # KL(edited || original)
                kl_part = settings.kl_factor * kl_value
                local_loss = kl_part if local_loss is None else local_loss + kl_part
            decay = settings.weight_decay * delta.norm() / init_norm.pow(2)

            terms = torch.zeros(2, dtype=torch.float64, device=device)  # [NLL sum, KL], over all rows
            if nll_sum is not None:
                terms[0] = nll_sum.detach().double()
            if kl_value is not None:
                terms[1] = kl_value.detach().double()
            terms = split.all_reduce_sum_(terms)
            nll = float(terms[0]) / n_rewrite
            loss_value = nll + settings.kl_factor * float(terms[1]) + float(decay.detach())
            if it == 0:
                nll_init, loss_init = nll, loss_value
            if loss_value < settings.early_stop_loss or it == settings.num_grad_steps - 1:
                break

            if not split.active:
                (local_loss + decay).backward()
            else:
                if local_loss is None and split.even and seqs:  # padding only: join the others' backward
                    local_loss = graph.sum() * 0.0
                if local_loss is not None:
                    local_loss.backward()
                grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
                delta.grad = split.all_reduce_sum_(grad)
                decay.backward()  # the same on every rank: added after the sum
            optimizer.step()
            steps += 1
            with torch.no_grad():
                max_norm = settings.clamp_norm_factor * init_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return ValueResult(
        delta=state["delta"].detach(),
        init=state["init"],
        nll_init=nll_init,
        nll=nll,
        loss_init=loss_init,
        loss=loss_value,
        steps=steps,
    )


class _PrefixReuse:
    """Runs the blocks below the site for real once, then has each return the output it gave then.

    Within one value optimisation the rows and the weights do not change, and ``delta`` enters above these blocks, so
    their outputs are the same every round. Each block's ``forward`` is replaced by one that returns its recorded
    output (the blocks' hooks still run); everything is restored on exit.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.outputs: dict[int, object] = {}
        self.handles: list = []
        self.replaying = False

    def __enter__(self) -> "_PrefixReuse":
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(
                lambda _module, _args, output, i=i: self.outputs.__setitem__(i, output)))
        return self

    def replay(self) -> None:
        if self.replaying or not self.blocks:
            return
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for i, block in enumerate(self.blocks):
            block.forward = lambda *args, _output=self.outputs[i], **kwargs: _output
        self.replaying = True

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.outputs = {}
