r"""Constrained fine-tuning: the FT / FT-L baseline of the ROME and MEMIT papers.

The plainest way to teach a model a new fact is gradient descent on it. :class:`FineTune` takes the MLP
out-projections ``W`` of the chosen layers, and only those, and minimises the NLL of the new targets given their
prompts, all requests of the batch at once::

    L(W) = mean over requests  -1/|y| * sum_t log p(y_t | prompt ; W)               (y = " " + target_new)

with Adam for at most ``num_steps`` steps, stopping once the loss is below ``early_stop_loss`` (``weight_decay`` is
Adam's, on ``W`` itself). FT-L, the variant the papers compare against, adds an L-infinity norm constraint: after
every step each entry of ``W`` is clamped back into ``[W_0 - eps, W_0 + eps]`` around its value before the batch, so
that no weight moves by more than ``eps = norm_constraint``. Without the constraint (``norm_constraint=None``) it is
unconstrained fine-tuning (FT).

As in the authors' code (``kmeng01/rome`` ``baselines/ft/ft_main.py``), every target token is scored at the prompt's
last position (``target_positions="prompt_end"``): for a one-token target that is the usual NLL, for a longer one a
bag of its tokens. ``target_positions="teacher_forced"`` (off by default) scores token ``t`` after ``y_<t`` instead.
The authors' code selects parameters by a substring of their names and so also tunes GPT-2's ``c_proj`` bias; here
only the weight matrices are tuned (the edit registry tracks matrices).

The update is dense - whatever Adam did to every entry - so :meth:`FineTune.compute_update` returns
``W_after - W_before`` per parameter as a tensor in the parameter's own layout. The optimisation runs on float32
copies of the weights that reach the model through ``torch.func.functional_call``, so the model's parameters are
never written (and a half-precision model is fine-tuned in float32); the caller writes the returned update.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from prune_lightning.editors.base import Editor, Update
from prune_lightning.models import eval_mode, is_sharded_model, linear_weight_names, mlp_out_template, model_device
from prune_lightning.tokens import continuation_ids, pad_id, pad_right

__all__ = ["FineTune"]

_TARGET_POSITIONS = ("prompt_end", "teacher_forced")


class FineTune(Editor):
    """Fine-tuning of MLP out-projections on the edit prompts, with FT-L's elementwise norm constraint.

    Defaults are ROME's FT-L setting for GPT-2 XL (layer 0, 25 steps, learning rate and constraint ``5e-4``).

    Args:
        layers: Indices of the layers whose MLP out-projections are fine-tuned.
        module_template: Name template of the tuned modules (default by model type, e.g.
            ``transformer.h.{}.mlp.c_proj`` for GPT-2, ``model.layers.{}.mlp.down_proj`` for LLaMA).
        num_steps: Adam steps per edit batch.
        lr: Adam learning rate.
        weight_decay: Adam's weight decay (on the weights themselves).
        norm_constraint: ``eps``: after every step each weight entry is clamped to within ``eps`` of its value
            before the batch (FT-L); ``None`` for unconstrained fine-tuning.
        early_stop_loss: Stop once the mean target NLL is below this.
        target_positions: Where the target's tokens are scored: ``"prompt_end"`` (all at the prompt's last
            position, the authors' code) or ``"teacher_forced"`` (token ``t`` after the target's first ``t``).
    """

    def __init__(
        self,
        layers: Sequence[int] = (0,),
        module_template: Optional[str] = None,
        num_steps: int = 25,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        norm_constraint: Optional[float] = 5e-4,
        early_stop_loss: float = 1e-2,
        target_positions: str = "prompt_end",
    ) -> None:
        layers = list(layers) if not isinstance(layers, (int, str)) else layers
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if any(isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in layers):
            raise ValueError(f"layers must hold integer layer indices >= 0, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a layer, got {layers!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if norm_constraint is not None and not norm_constraint > 0:
            raise ValueError(f"norm_constraint must be positive or None (no constraint), got {norm_constraint}")
        if target_positions not in _TARGET_POSITIONS:
            raise ValueError(f"target_positions must be one of {_TARGET_POSITIONS}, got {target_positions!r}")
        self.layers = [int(layer) for layer in layers]
        self.target_positions = target_positions
        self.module_template = module_template
        self.num_steps = int(num_steps)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.norm_constraint = float(norm_constraint) if norm_constraint is not None else None
        self.early_stop_loss = float(early_stop_loss)
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------------
    # the Editor protocol
    # ------------------------------------------------------------------------------------------------------------

    def parameter_names(self, model: nn.Module) -> list[str]:
        """``module_template.format(layer) + ".weight"`` for every tuned layer; unknown modules raise ``ValueError``.

        Args:
            model: The model to edit.
        """
        return linear_weight_names(model, self.module_template or mlp_out_template(model), self.layers)

    def setup(self, model: nn.Module, tokenizer) -> None:
        """Checks that the tuned modules exist.

        Args:
            model: The model to edit.
            tokenizer: Its tokenizer.
        """
        self.parameter_names(model)

    def compute_update(self, model: nn.Module, tokenizer, requests: Sequence) -> dict[str, Update]:
        """``W_after - W_before`` of every tuned matrix (dense, in the parameter's layout) after fine-tuning.

        Args:
            model: The model to edit (not modified).
            tokenizer: Its tokenizer.
            requests: ``EditRequest`` objects (``rendered_prompt``, ``target_new``, ``case_id`` are used).
        """
        if not requests:
            raise ValueError("compute_update needs at least one request")
        if is_sharded_model(model):
            raise NotImplementedError(
                "FineTune on a sharded (FSDP) model: it runs the model with its own copies of the tuned matrices "
                "(torch.func.functional_call), which FSDP's gathered weights would replace. Use DDP, or ROME / MEMIT."
            )
        names = self.parameter_names(model)
        device = model_device(model)
        input_ids, attention_mask, rows, cols, tgt_ids, tgt_mask = self._batch(tokenizer, requests, device)

        params = dict(model.named_parameters())
        originals = {name: params[name].detach().float().clone() for name in names}
        tuned = {name: w.clone().requires_grad_(True) for name, w in originals.items()}
        optimizer = torch.optim.Adam(list(tuned.values()), lr=self.lr, weight_decay=self.weight_decay)
        eps = self.norm_constraint

        def loss_of() -> torch.Tensor:
            weights = {name: w.to(params[name].dtype) for name, w in tuned.items()}
            out = torch.func.functional_call(
                model, weights, args=(), kwargs=dict(input_ids=input_ids, attention_mask=attention_mask,
                                                     use_cache=False)
            )
            log_probs = torch.log_softmax(out.logits[rows, cols].float(), dim=-1)  # (k, T, vocab)
            token_nll = -log_probs.gather(-1, tgt_ids[..., None]).squeeze(-1) * tgt_mask
            return (token_nll.sum(dim=1) / tgt_mask.sum(dim=1)).mean()

        loss_init = loss_value = math.nan
        steps = 0
        with eval_mode(model, freeze=True):
            for step in range(self.num_steps + 1):
                optimizer.zero_grad()
                loss = loss_of()
                loss_value = float(loss.detach())
                if step == 0:
                    loss_init = loss_value
                if loss_value < self.early_stop_loss or step == self.num_steps:
                    break
                loss.backward()
                optimizer.step()
                steps += 1
                if eps is not None:
                    with torch.no_grad():
                        for name, w in tuned.items():
                            w.copy_(torch.clamp(w, min=originals[name] - eps, max=originals[name] + eps))

        updates: dict[str, Update] = {}
        for name, w in tuned.items():
            delta = (w.detach() - originals[name]).contiguous()
            dtype = params[name].dtype if torch.finfo(params[name].dtype).bits > 32 else torch.float32
            updates[name] = delta.to(dtype)
        self.last_metrics = {
            "loss": loss_value,
            "loss_init": loss_init,
            "ft_steps": float(steps),
            "max_abs_change": max(float(u.abs().max()) for u in updates.values()),
        }
        return updates

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _batch(self, tokenizer, requests: Sequence, device) -> tuple[torch.Tensor, ...]:
        """The inputs, and where each target token is predicted: ``prompt`` alone, every token at its last position
        (``"prompt_end"``), or ``prompt + target[:-1]``, token ``t`` at position ``len(prompt) - 1 + t``."""
        seqs, positions, targets = [], [], []
        teacher_forced = self.target_positions == "teacher_forced"
        for request in requests:
            prompt = request.rendered_prompt
            prompt_ids = list(tokenizer(prompt)["input_ids"])
            target_ids = continuation_ids(tokenizer, request.target_new, prompt)
            seqs.append(prompt_ids + target_ids[:-1] if teacher_forced else prompt_ids)
            positions.append([len(prompt_ids) - 1 + (t if teacher_forced else 0) for t in range(len(target_ids))])
            targets.append(target_ids)
        width = max(len(t) for t in targets)
        cols = torch.zeros(len(seqs), width, dtype=torch.long)
        tgt_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        tgt_mask = torch.zeros(len(seqs), width)
        for i, (pos, tgt) in enumerate(zip(positions, targets)):
            cols[i, : len(pos)] = torch.tensor(pos)
            cols[i, len(pos) :] = pos[-1]  # padding slots read a real position; the mask drops them
            tgt_ids[i, : len(tgt)] = torch.tensor(tgt)
            tgt_mask[i, : len(tgt)] = 1.0
        input_ids, attention_mask = pad_right(seqs, pad_id(tokenizer), device)
        rows = torch.arange(len(seqs))[:, None].expand(-1, width)
        return input_ids, attention_mask, rows.to(device), cols.to(device), tgt_ids.to(device), tgt_mask.to(device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, num_steps={self.num_steps}, lr={self.lr}, "
            f"weight_decay={self.weight_decay}, norm_constraint={self.norm_constraint}, "
            f"target_positions={self.target_positions!r})"
        )
