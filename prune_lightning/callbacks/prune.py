r"""PRUNE: restrain the large singular values of the accumulated edit update.

Ma et al., "Perturbation-Restrained Sequential Model Editing" (ICLR 2025) observe that after many edits the
edited matrix :math:`W_n = W_0 + \Delta W` grows ill-conditioned - a few singular values of the accumulated update
:math:`\Delta W` become much larger than those of :math:`W_0` - and that this is when general abilities collapse.
PRUNE takes the SVD :math:`\Delta W = U \,\mathrm{diag}(s)\, V^\top` and replaces every :math:`s_i \ge
\sigma_{\max}(W_0)` by

.. math::  F(s_i) = \log_\alpha(s_i) - \log_\alpha(\sigma_{\max}) + \sigma_{\max}

(or :math:`(s_i + \sigma_{\max}) / 2` with ``kind="linear"``), then writes :math:`W = W_0 + U\,\mathrm{diag}(F(s))
V^\top`. Values below the threshold - where the edits carry most of their specific knowledge - are left alone.

:math:`F` is continuous at the threshold and grows like :math:`\log_\alpha`; its slope there is
:math:`1 / (\sigma_{\max} \ln \alpha)`, so it shrinks values just above the threshold only when
:math:`\sigma_{\max}(W_0) \ln\alpha > 1`. Otherwise it enlarges them, and the callback warns (once per matrix).

Modes:

- ``online``: restrain after every ``every_n_edits``-th write, so later edits are computed on the restrained model;
- ``post_hoc``: restrain once, at the end of fit (what the paper's released code does).

The callback works inside :class:`~prune_lightning.SequentialEditor` (low-rank path: thin QR of the update's
factors plus an SVD of a small core) and inside any LightningModule that changes its weights, given ``modules``
(dense path, ``W_0`` snapshotted at fit start).
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from prune_lightning.callbacks._restraint import RestraintCallback
from prune_lightning.registry import EditedMatrix
from prune_lightning.spectral import restraint_threshold_shrinks


class PRUNECallback(RestraintCallback):
    """Restrains the accumulated update of every edited matrix after writes (PRUNE, ICLR 2025).

    Logs per matrix ``prune/<matrix>/sigma_max_dW_before``, ``.../sigma_max_dW_after`` and ``.../restrained`` (how
    many singular values were at or above ``sigma_max(W_0)``).

    Args:
        alpha: Base of the logarithm in ``F``; any ``alpha > 1``.
        kind: ``"log"`` (the paper's ``F``) or ``"linear"`` (``(s + sigma_max) / 2``).
        mode: ``"online"`` (after every ``every_n_edits``-th write) or ``"post_hoc"`` (once at the end of fit).
        every_n_edits: In online mode, restrain after every n-th write (optimizer step).
        modules: Names or glob patterns of the matrices to restrain (default: every edited matrix). Required outside
            ``SequentialEditor``.
        offload_w0: When this callback snapshots ``W_0`` itself, keep the copies in CPU memory.
    """

    metric_prefix = "prune"

    def __init__(
        self,
        alpha: float = math.e,
        kind: str = "log",
        mode: str = "online",
        every_n_edits: int = 1,
        modules: Union[str, Sequence[str], None] = None,
        offload_w0: bool = False,
    ) -> None:
        super().__init__(mode=mode, every_n_edits=every_n_edits, modules=modules, offload_w0=offload_w0)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 1):
            raise ValueError(f"PRUNECallback: alpha must be a finite number > 1 (the base of the logarithm), got "
                             f"{alpha!r}")
        if kind not in ("log", "linear"):
            raise ValueError(f"PRUNECallback: kind must be 'log' or 'linear', got {kind!r}")
        self.alpha = float(alpha)
        self.kind = kind
        self.warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, kind=self.kind, mode=self.mode,
                                        every_n_edits=self.every_n_edits, modules=self.modules)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        registry = self._registry(pl_module)
        for name in self._names(registry):
            self._check_threshold(name, registry[name].sigma_max0)

    def _check_threshold(self, name: str, sigma_max0: float) -> None:
        if self.kind != "log" or name in self.warned or restraint_threshold_shrinks(sigma_max0, self.alpha):
            return
        self.warned.add(name)
        rank_zero_warn(
            f"PRUNECallback: sigma_max(W_0) * ln(alpha) = {sigma_max0 * math.log(self.alpha):.3g} <= 1 for {name}: "
            f"F enlarges singular values just above the threshold sigma_max(W_0) = {sigma_max0:.4g} instead of "
            "shrinking them. Choose a larger alpha."
        )

    @override
    def restrain_matrix(self, entry: EditedMatrix) -> dict[str, float]:
        self._check_threshold(entry.name, entry.sigma_max0)
        before = entry.delta.sigma_max()
        count = entry.delta.restrain(entry.sigma_max0, alpha=self.alpha, kind=self.kind)
        after = entry.delta.sigma_max() if count else before
        return {"sigma_max_dW_before": before, "sigma_max_dW_after": after, "restrained": float(count),
                "sigma_max_w0": entry.sigma_max0, "changed": float(count)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warned": sorted(self.warned)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.warned = set(state_dict.get("warned", []))


__all__ = ["PRUNECallback"]
