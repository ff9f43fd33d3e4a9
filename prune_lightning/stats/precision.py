"""The precision of the statistics job's forward pass, apart from that of its sums.

The forward pass is most of the job's time. ``forward_precision`` lowers it while the sums ``S += K^T K`` stay in
the accumulation dtype (float32 or float64):

- ``"model"`` (default): the model's parameters' dtype, float32 matmuls at full precision;
- ``"bfloat16"``: the forward under ``torch.autocast(dtype=torch.bfloat16)`` (on CUDA and on CPU); the keys come out
  in bfloat16 and are cast up before they are summed;
- ``"tf32"``: float32 matmuls with TF32 inputs (``torch.set_float32_matmul_precision("high")``): Ampere and later
  GPUs. On a CPU it changes nothing.

Inside the forward, the hooks that add the keys to the sums run under :func:`accumulation_context`, which switches
autocast off and the matmul precision back to ``"highest"``, so the sums are never computed in reduced precision. A
``C`` from a lower-precision forward is a different ``C``: the setting is part of its provenance
(``forward_precision``). ``benchmarks/stats_throughput.py`` measures its error against the float32 ``C`` and its speed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["FORWARD_PRECISIONS", "accumulation_context", "check_forward_precision", "forward_context",
           "precision_warning"]

FORWARD_PRECISIONS = ("model", "bfloat16", "tf32")


def check_forward_precision(value: Optional[str]) -> Optional[str]:
    """``value`` if it is one of :data:`FORWARD_PRECISIONS` or None; a ``ValueError`` naming it otherwise."""
    if value is not None and value not in FORWARD_PRECISIONS:
        raise ValueError(f"forward_precision must be one of {list(FORWARD_PRECISIONS)} (or None), got {value!r}")
    return value


def precision_warning(forward_precision: Optional[str], device_type: str) -> Optional[str]:
    """What to tell a user whose lower-precision forward will not pay off on this device (None: nothing).

    Args:
        forward_precision: The setting.
        device_type: Where the model runs.
    """
    if device_type != "cpu" or forward_precision in (None, "model"):
        return None
    if forward_precision == "tf32":
        return "forward_precision='tf32' changes nothing on a CPU (TF32 is a GPU feature); the forward runs in float32."
    return ("forward_precision='bfloat16' on a CPU is emulated unless the CPU has bfloat16 matmul units (AMX, "
            "AVX512-BF16): it can be many times slower than float32 (34x on the machine of benchmarks/"
            "stats_throughput.py). It is meant for GPUs.")


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def forward_context(forward_precision: Optional[str], device_type: str) -> Iterator[None]:
    """The precision of the job's forward pass (see the module docstring).

    Args:
        forward_precision: ``"model"`` / None, ``"bfloat16"`` or ``"tf32"``.
        device_type: ``"cuda"``, ``"cpu"``, ...: where the model runs.
    """
    if forward_precision == "bfloat16":
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            yield
    elif forward_precision == "tf32":
        with _matmul_precision("high"):
            yield
    else:
        yield


@contextlib.contextmanager
def accumulation_context(device_type: str) -> Iterator[None]:
    """Full precision for the sums inside a lower-precision forward: no autocast, float32 matmuls at ``"highest"``.

    Args:
        device_type: Where the sums are computed.
    """
    with torch.autocast(device_type=device_type, enabled=False), _matmul_precision("highest"):
        yield
