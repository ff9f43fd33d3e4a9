r"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

ROME and MEMIT solve for an update; MEND *learns* one. A hypernetwork, trained beforehand (``prune-edit mend-train``,
:class:`~prune_lightning.mend.MENDTrainer`), turns the fine-tuning gradient of the edit into a weight update. For one
edit batch:

1. The edit loss ``L`` is the mean teacher-forced NLL of the new targets after their prompts
   (:mod:`prune_lightning.mend.gradients`). One forward and backward pass give, for every edited matrix ``W_l``
   and every token ``t`` with a gradient, the layer's input ``u_t`` and output gradient ``delta_t``; ``dL/dW_l =
   sum_t delta_t u_t^T``.
2. The hypernetwork (:class:`~prune_lightning.mend.MENDHypernetwork`) maps each pair to ``(u~_t, delta~_t)``;
   the update is ``dW_l = -lr_l * sum_t delta~_t u~_t^T``, with the matrix's learned step size ``lr_l``.

So each update comes as factors of rank at most the number of token rows with a gradient: for one request, about
its prompt's and target's tokens (for the last layer only the positions that predict target tokens). They are
returned as :class:`~prune_lightning.editors.base.LowRankUpdate` in the parameter's own layout, which PRUNE's tracker
and the condition-number monitor take as they are.

Which matrices: ``layers`` x ``module_templates`` - by default GPT-2's ``mlp.c_proj`` and ``mlp.c_fc`` and LLaMA's
``gate_proj``, ``up_proj`` and ``down_proj`` of the last three layers, as in the references and the PRUNE paper
(GPT-2 XL 45-47; LLaMA-2-7B / LLaMA-3-8B 29-31). The hypernetwork file records the matrices and shapes it was trained
for; the editor refuses a model or layers that differ, with one error naming the file and the difference.

Several processes: under :class:`~prune_lightning.SequentialEditor`'s DDP every rank computes the same update (one
forward and backward pass; there are no rows to split) and the module broadcasts rank 0's. A sharded model (FSDP2)
is refused: MEND's pass through the whole model has not been tested on shards.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.mend.gradients import (adding_updates, capture_factors, matrix_shapes, mend_parameter_names,
                                            target_log_probs, teacher_forced_batch, token_nll)
from prune_lightning.mend.hypernet import check_compatible, load_hypernetwork
from prune_lightning.models import eval_mode, get_module, is_sharded_model, model_device, rank_one_in_layout

__all__ = ["MEND", "MEND_PRESETS"]

# The matrices of the PRUNE paper's MEND runs (EasyEdit hparams/MEND/{gpt2-xl,llama-7b,llama3-8b}.yaml); the trained
# hypernetwork itself must come from the user (prune-edit mend-train --config configs/<model>/mend-train.yaml).
MEND_PRESETS: dict[str, dict] = {
    "gpt2-xl": dict(layers=[45, 46, 47], module_templates=["transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp.c_fc"]),
    "llama2-7b": dict(layers=[29, 30, 31], module_templates=[
        "model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"]),
}
MEND_PRESETS["llama3-8b"] = dict(MEND_PRESETS["llama2-7b"])


class MEND(Editor):
    """Edits with a trained MEND hypernetwork: one forward and backward pass and one hypernetwork pass per batch.

    Args:
        hypernetwork: Path of a trained hypernetwork: the ``.safetensors`` file ``prune-edit mend-train`` writes, or a
            MENDTrainer checkpoint (``.ckpt``).
        layers: Layers whose matrices are edited (default: the ones the hypernetwork was trained for). Must match the
            file.
        module_templates: Name templates of the edited modules in each layer (default: the file's; else by model
            type).

    Raises:
        ValueError: For a missing ``hypernetwork``, malformed ``layers`` / ``module_templates``, a file that is no
            MEND hypernetwork, or layers that differ from the file's.
        FileNotFoundError: If the file does not exist.
    """

    presets = MEND_PRESETS

    def __init__(
        self,
        hypernetwork: Optional[Union[str, os.PathLike]] = None,
        layers: Optional[Sequence[int]] = None,
        module_templates: Optional[Sequence[str]] = None,
    ) -> None:
        if hypernetwork is None or not str(hypernetwork):
            raise ValueError("MEND needs a trained hypernetwork: MEND(hypernetwork=PATH); train one with "
                             "'prune-edit mend-train --config configs/<model>/mend-train.yaml'")
        if layers is not None:
            layers = list(layers) if not isinstance(layers, (int, str)) else layers
            if not isinstance(layers, list) or not layers or any(
                    isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
                raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat a layer, got {layers!r}")
        if module_templates is not None:
            module_templates = [module_templates] if isinstance(module_templates, str) else list(module_templates)
            bad = [t for t in module_templates if not isinstance(t, str) or t.count("{}") != 1]
            if not module_templates or bad:
                raise ValueError(f"module_templates must be names with one '{{}}' for the layer, got "
                                 f"{module_templates!r}")
        self.hypernetwork_path = str(hypernetwork)
        self.net, self.info = load_hypernetwork(self.hypernetwork_path)
        trained_layers = self.info.get("layers")
        if layers is not None and trained_layers is not None and list(trained_layers) != list(layers):
            raise ValueError(f"MEND hypernetwork file {self.hypernetwork_path!r} was trained for layers "
                             f"{list(trained_layers)}, not {list(layers)}")
        self.layers = [int(x) for x in layers] if layers is not None else (
            [int(x) for x in trained_layers] if trained_layers is not None else None)
        self.module_templates = module_templates if module_templates is not None else self.info.get("module_templates")
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------------
    # the Editor protocol
    # ------------------------------------------------------------------------------------------------------------

    def parameter_names(self, model: nn.Module) -> list[str]:
        """The edited matrices: ``layers`` x ``module_templates`` (or the file's matrices when it names no layers).

        Args:
            model: The model to edit.
        """
        if self.layers is None:
            names = list(self.net.parameter_names)
            for name in names:
                get_module(model, name.rsplit(".", 1)[0])
            return names
        return mend_parameter_names(model, self.layers, self.module_templates)

    def setup(self, model: nn.Module, tokenizer) -> None:
        """Checks that the hypernetwork was trained for these matrices and shapes; moves it to the model's device.

        Args:
            model: The model to edit.
            tokenizer: Its tokenizer.
        """
        if is_sharded_model(model):
            raise NotImplementedError(
                "MEND on a sharded (FSDP) model: its forward and backward pass through the whole model has not been "
                "tested on shards. Use DDP (every rank holds the model), or ROME / MEMIT.")
        names = self.parameter_names(model)
        check_compatible(self.net, matrix_shapes(model, names), self.hypernetwork_path)
        self.net.to(model_device(model)).eval()

    def compute_update(self, model: nn.Module, tokenizer, requests: Sequence) -> dict[str, Update]:
        """The update of every edited matrix for the batch's new targets (rank <= the batch's token rows).

        Args:
            model: The model to edit (not modified).
            tokenizer: Its tokenizer.
            requests: ``EditRequest`` objects (``rendered_prompt`` and ``target_new`` are used).
        """
        if not requests:
            raise ValueError("compute_update needs at least one request")
        names = self.parameter_names(model)
        modules = {name: get_module(model, name.rsplit(".", 1)[0]) for name in names}
        device = model_device(model)
        self.net.to(device).eval()
        batch = teacher_forced_batch(tokenizer, [r.rendered_prompt for r in requests],
                                     [r.target_new for r in requests], device)
        with eval_mode(model, freeze=True):
            loss_init, factors = capture_factors(model, modules,
                                                 lambda: token_nll(target_log_probs(model, batch), batch))
            with torch.no_grad():
                rows = self.net(factors)
                with adding_updates(modules, rows):
                    loss = token_nll(target_log_probs(model, batch), batch)
        updates: dict[str, Update] = {}
        for name, (values, keys) in rows.items():
            weight = modules[name].weight
            dtype = weight.dtype if torch.finfo(weight.dtype).bits > 32 else torch.float32
            # dW = values^T keys in (out, in) terms: value factor (out, r), key factor (in, r)
            left, right = rank_one_in_layout(modules[name], values.T.to(dtype), keys.T.to(dtype))
            updates[name] = LowRankUpdate(left.contiguous(), right.contiguous())
        self.last_metrics = {
            "loss": float(loss),
            "loss_init": float(loss_init),
            "mend_rank": sum(keys.shape[0] for _, keys in rows.values()) / len(rows),
        }
        return updates

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hypernetwork={self.hypernetwork_path!r}, layers={self.layers})"
