r"""RECT: keep only the largest relative changes of the accumulated update.

Gu et al., "Model Editing Harms General Abilities of Large Language Models: Regularization to the Rescue" (2024)
regularise an edit by its *relative* change :math:`|\Delta W_{ij}| / |W_{0,ij}|`: only the top ``ratio`` fraction
of entries of :math:`\Delta W` by relative change are kept (the paper keeps 20%), the rest are set to zero, and
:math:`W = W_0 + \Delta W` is written back. Element-wise, so the update is kept dense afterwards.

Online (after every ``every_n_edits``-th write) or post hoc (once at the end of fit), like
:class:`~prune_lightning.callbacks.PRUNECallback`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from typing_extensions import override

from prune_lightning.callbacks._restraint import RestraintCallback
from prune_lightning.registry import EditedMatrix


def rect_mask(w0: torch.Tensor, delta: torch.Tensor, ratio: float, eps: float = 1e-12) -> torch.Tensor:
    """Boolean mask of the ``ratio`` fraction of entries with the largest ``|delta| / |w0|`` (ties kept)."""
    relative = delta.abs() / (w0.abs() + eps)
    keep = max(int(round(ratio * relative.numel())), 0)
    if keep == 0:
        return torch.zeros_like(relative, dtype=torch.bool)
    if keep >= relative.numel():
        return torch.ones_like(relative, dtype=torch.bool)
    threshold = torch.kthvalue(relative.flatten(), relative.numel() - keep + 1).values
    return relative >= threshold


class RECTCallback(RestraintCallback):
    """Keeps the top ``ratio`` of the accumulated update's entries by relative change ``|dW| / |W_0|`` (RECT).

    Logs per matrix ``rect/<matrix>/kept`` (entries kept) and ``rect/<matrix>/norm_dW_before`` / ``..._after``.

    Args:
        ratio: Fraction of entries kept, in ``(0, 1]`` (the RECT paper uses 0.2).
        mode: ``"online"`` (after every ``every_n_edits``-th write) or ``"post_hoc"`` (once at the end of fit).
        every_n_edits: In online mode, act after every n-th write (optimizer step).
        modules: Names or glob patterns of the matrices (default: every edited matrix). Required outside
            ``SequentialEditor``.
        offload_w0: When this callback snapshots ``W_0`` itself, keep the copies in CPU memory.
    """

    metric_prefix = "rect"

    def __init__(
        self,
        ratio: float = 0.2,
        mode: str = "online",
        every_n_edits: int = 1,
        modules: Union[str, Sequence[str], None] = None,
        offload_w0: bool = False,
    ) -> None:
        super().__init__(mode=mode, every_n_edits=every_n_edits, modules=modules, offload_w0=offload_w0)
        if not 0 < ratio <= 1:
            raise ValueError(f"RECTCallback: ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ratio=self.ratio, mode=self.mode, every_n_edits=self.every_n_edits,
                                        modules=self.modules)

    @override
    def restrain_matrix(self, entry: EditedMatrix) -> dict[str, float]:
        if entry.delta.is_empty:
            return {"kept": 0.0, "norm_dW_before": 0.0, "norm_dW_after": 0.0, "changed": 0.0}
        delta = entry.delta.dense()
        mask = rect_mask(entry.w0_on(delta.device), delta, self.ratio)
        restrained = delta * mask
        entry.delta.set_dense(restrained)
        return {"kept": float(mask.sum()), "norm_dW_before": float(torch.linalg.matrix_norm(delta)),
                "norm_dW_after": float(torch.linalg.matrix_norm(restrained)), "changed": 1.0}


__all__ = ["RECTCallback", "rect_mask"]
