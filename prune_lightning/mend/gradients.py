r"""What MEND reads off a model and writes back: the edit loss, its gradient's factors, the update in a forward pass.

The edit loss (``edit_loss_fn`` in the references: ``masked_log_probs``) is the teacher-forced negative
log-likelihood of the new target after the prompt, averaged over all target tokens of the batch::

    L = - 1/N  sum_i sum_t  log p(y_it | prompt_i, y_i,<t)          N = all target tokens of the batch

The target's tokens are :func:`prune_lightning.tokens.continuation_ids` - the definition the other editors and the
metrics share. The model reads ``prompt + target[:-1]``: the last target token's position predicts nothing that is
scored, so its gradient is zero and MEND would drop it anyway.

The factors (``hooks.py`` in the references). For every edited module, a forward hook keeps its input ``u``
``(batch, length, in)`` and its output; ``torch.autograd.grad`` of ``L`` with respect to the outputs gives ``delta``
``(batch, length, out)``, without touching any parameter's ``.grad``. The rows are the tokens; rows whose ``u`` or
``delta`` is all zero (padding, and positions after the last scored one, whose outputs nothing scored depends on) are
dropped, as the references do. Then ``sum_t delta_t u_t^T`` is exactly ``dL/dW`` in ``(out, in)`` terms (for GPT-2's
``Conv1D``, which stores ``W^T``, its transpose). The model's parameters need not require gradients: the first edited
module's output is made a leaf that does.

The update in a forward pass (:func:`adding_updates`). MEND's training loss is computed on the *edited* model,
``W + dW(phi)`` with ``dW`` depending on the hypernetwork's parameters ``phi``. Instead of forming ``dW`` (``out x in``
per matrix), a forward hook adds ``x dW^T = (x keys^T) values`` to each edited module's output: the same function, at
the cost of the rank, differentiable in ``phi``.

The locality loss (``kl_loc_loss``): ``KL(p_before || p_after)`` of the next-token distributions, averaged over the
positions that predict the locality answer's tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from prune_lightning.models import get_module, input_dim, is_transposed, num_layers, output_dim, removing_hooks
from prune_lightning.tokens import continuation_ids, pad_id, pad_right

__all__ = [
    "MEND_MODULE_TEMPLATES",
    "TokenBatch",
    "adding_updates",
    "capture_factors",
    "default_layers",
    "kl_locality",
    "matrix_shapes",
    "mend_parameter_names",
    "target_log_probs",
    "teacher_forced_batch",
    "token_accuracy",
    "token_nll",
]

#: The modules MEND edits in each layer, by model type, in the references' order: GPT-2 XL ``c_proj, c_fc``
#: (``config/model/gpt2xl.yaml``); LLaMA ``gate_proj, up_proj, down_proj`` (EasyEdit ``hparams/MEND/llama-7b.yaml``).
MEND_MODULE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp.c_fc"),
    "llama": ("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"),
    "mistral": ("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"),
    "qwen2": ("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"),
}


# --------------------------------------------------------------------------------------------------------------------
# which matrices
# --------------------------------------------------------------------------------------------------------------------


def default_layers(model: nn.Module) -> list[int]:
    """The last three layers, as both references edit them (GPT-2 XL 45-47 of 48, LLaMA 29-31 of 32)."""
    n = num_layers(model)
    if n is None:
        raise ValueError("Cannot tell the number of layers of this model; give MEND's layers explicitly")
    return list(range(max(0, n - 3), n))


def mend_parameter_names(model: nn.Module, layers: Sequence[int], module_templates: Optional[Sequence[str]] = None
                         ) -> list[str]:
    """``template.format(layer) + ".weight"`` for every layer and every template, layer by layer.

    Args:
        model: The model.
        layers: Layer indices.
        module_templates: Name templates with one ``{}`` (default: :data:`MEND_MODULE_TEMPLATES` of the model type).

    Raises:
        ValueError: For a model type without default templates, or a module that does not exist or is not linear.
    """
    if module_templates is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MEND_MODULE_TEMPLATES:
            raise ValueError(f"No default MEND modules for model type {model_type!r} (known: "
                             f"{sorted(MEND_MODULE_TEMPLATES)}); give module_templates explicitly")
        module_templates = MEND_MODULE_TEMPLATES[model_type]
    names = []
    for layer in layers:
        for template in module_templates:
            module = get_module(model, template.format(layer))
            try:
                is_transposed(module)
            except TypeError as err:
                raise ValueError(f"MEND edits linear layers; {template.format(layer)}: {err}") from None
            names.append(template.format(layer) + ".weight")
    return names


def matrix_shapes(model: nn.Module, parameter_names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}``: the input and output lengths of each edited module (layout-independent)."""
    shapes = {}
    for name in parameter_names:
        module = get_module(model, name.rsplit(".", 1)[0])
        shapes[name] = (input_dim(module), output_dim(module))
    return shapes


# --------------------------------------------------------------------------------------------------------------------
# batches and losses
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Prompts followed by their targets, right-padded, and where each target token is predicted.

    Args:
        input_ids: ``(batch, length)`` token ids of ``prompt + target[:-1]``.
        attention_mask: ``(batch, length)``.
        positions: ``(batch, T)`` the position whose logits predict target token ``t`` (padding slots repeat a real
            position; ``mask`` drops them).
        targets: ``(batch, T)`` the target token ids.
        mask: ``(batch, T)`` 1.0 for real target tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def teacher_forced_batch(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                         device: Any = None) -> TokenBatch:
    """The batch that scores ``" " + target`` after each prompt, teacher-forced.

    Args:
        tokenizer: The model's tokenizer.
        prompts: Complete prompts (``"Tamo Rivek lives in"``).
        targets: One target per prompt, without its leading space.
        device: Where the tensors go.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts, at least one; got {len(prompts)} and {len(targets)}")
    seqs, positions, target_ids = [], [], []
    for prompt, target in zip(prompts, targets):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        ids = continuation_ids(tokenizer, target, prompt)
        seqs.append(prompt_ids + ids[:-1])
        positions.append([len(prompt_ids) - 1 + t for t in range(len(ids))])
        target_ids.append(ids)
    width = max(len(t) for t in target_ids)
    pos = torch.zeros(len(seqs), width, dtype=torch.long)
    tgt = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width)
    for i, (p, t) in enumerate(zip(positions, target_ids)):
        pos[i, : len(p)] = torch.tensor(p)
        pos[i, len(p):] = p[-1]
        tgt[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1.0
    input_ids, attention_mask = pad_right(seqs, pad_id(tokenizer), device)
    return TokenBatch(input_ids, attention_mask, pos.to(device), tgt.to(device), mask.to(device))


def target_log_probs(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Log-probabilities ``(batch, T, vocab)`` (float32) of the next token at the positions that predict targets."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    rows = torch.arange(len(batch), device=logits.device)[:, None]
    return torch.log_softmax(logits[rows, batch.positions].float(), dim=-1)


def token_nll(log_probs: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean NLL over all target tokens of the batch (the references' ``masked_log_probs(...)["nll"]``)."""
    picked = log_probs.gather(-1, batch.targets[..., None]).squeeze(-1)
    return -(picked * batch.mask).sum() / batch.mask.sum()


def token_accuracy(log_probs: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Share of target tokens that are the argmax at their position (teacher-forced; EasyEdit's token accuracy)."""
    correct = (log_probs.argmax(-1) == batch.targets).float() * batch.mask
    return correct.sum() / batch.mask.sum()


def kl_locality(before: torch.Tensor, after: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """``KL(p_before || p_after)`` per position, averaged over the batch's target positions (``kl_loc_loss``)."""
    kl = (before.exp() * (before - after)).sum(-1)
    return (kl * batch.mask).sum() / batch.mask.sum()


# --------------------------------------------------------------------------------------------------------------------
# factors and updates
# --------------------------------------------------------------------------------------------------------------------


def capture_factors(model: nn.Module, modules: Mapping[str, nn.Module], loss_fn: Callable[[], torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Runs ``loss_fn()`` (a forward pass of ``model``) and returns the loss and each module's gradient factors.

    Args:
        model: The model ``loss_fn`` runs (its parameters need not require gradients).
        modules: ``{name: module}`` of the edited linear modules; each must run exactly once in the forward pass.
        loss_fn: Computes the loss with one forward pass of ``model``.

    Returns:
        ``(loss, {name: (u, delta)})`` with rows ``u`` ``(n, in)`` and ``delta`` ``(n, out)`` in float32, rows with an
        all-zero ``u`` or ``delta`` dropped; ``sum_t delta_t u_t^T = dL/dW`` in ``(out, in)`` terms.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if name in inputs:
                raise RuntimeError(f"MEND: module {name} ran twice in one forward pass; it edits modules that run once")
            inputs[name] = args[0].detach()
            if not output.requires_grad:  # nothing below needs a gradient: make this output the leaf that does
                output = output.detach().requires_grad_(True)
            outputs[name] = output
            return output

        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    with removing_hooks(*handles), torch.enable_grad():
        loss = loss_fn()
    missing = [name for name in modules if name not in outputs]
    if missing:
        raise RuntimeError(f"MEND: modules {missing} did not run in the forward pass")
    names = list(modules)
    grads = torch.autograd.grad(loss, [outputs[name] for name in names], allow_unused=True)
    factors = {}
    for name, grad in zip(names, grads):
        u = inputs[name].reshape(-1, inputs[name].shape[-1]).float()
        if grad is None:
            grad = torch.zeros(*outputs[name].shape, device=u.device)
        delta = grad.reshape(-1, grad.shape[-1]).float()
        keep = (u != 0).any(-1) & (delta != 0).any(-1)
        factors[name] = (u[keep], delta[keep])
    return loss.detach(), factors


@contextlib.contextmanager
def adding_updates(modules: Mapping[str, nn.Module], updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
                   ) -> Iterator[None]:
    """Inside, each module computes as if its weight were ``W + values^T keys`` (``(out, in)`` terms).

    Args:
        modules: ``{name: module}``.
        updates: ``{name: (values (r, out), keys (r, in))}`` (:meth:`MENDHypernetwork.forward`); differentiable.
    """
    def hook(values: torch.Tensor, keys: torch.Tensor) -> Callable:
        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            extra = (x.to(keys.dtype) @ keys.T) @ values
            return output + extra.to(output.dtype)

        return add

    handles = [modules[name].register_forward_hook(hook(*updates[name])) for name in updates]
    with removing_hooks(*handles):
        yield
