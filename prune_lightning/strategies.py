"""The Lightning strategies sequential editing runs under, and the plumbing each one needs.

Sequential editing is order-dependent, so the request stream is never split: every rank edits every request, in
order, and must end each step with the same weights (:mod:`prune_lightning.distributed` holds the collectives and the
split of the work inside one edit). Two kinds of multi-process strategy fit that:

- **replicas** - any ``DDPStrategy`` (``ddp``, ``ddp_spawn``, ...): every rank holds the whole model. Lightning wraps
  the module in ``DistributedDataParallel``, which refuses a module without a trainable parameter and would
  otherwise allocate gradient buckets as large as the model: the model is frozen for the fit and the module carries
  a one-element ``ddp_anchor`` parameter, never used, saved or loaded (:func:`drop_ddp_anchor`,
  :func:`ignore_ddp_anchor`).
- **shards** - ``ModelParallelStrategy`` (FSDP2): the model is sharded, one unit per decoder layer, over
  :func:`fsdp_mesh`; its checkpoints need a real optimizer, so the module hands Lightning :class:`NoUpdates`.

A restraint (PRUNE, RECT) computed on one rank reaches the others with :func:`broadcast_restraint`.

Everything else that runs several processes is refused, by type, with a message that says what to use instead
(:func:`strategy_kind` for the module, :func:`refuse_flattened_shards` for the callbacks that read matrices):
DeepSpeed and Lightning's FSDP1 ``FSDPStrategy`` hold flattened parameter shards that an edit cannot address as
matrices.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from prune_lightning import distributed
from prune_lightning.spectral import DeltaTracker, LowRankUpdate

__all__ = [
    "NoUpdates",
    "broadcast_restraint",
    "broadcast_updates",
    "check_same_batch",
    "drop_ddp_anchor",
    "fsdp_mesh",
    "ignore_ddp_anchor",
    "refuse_flattened_shards",
    "strategy_kind",
    "workers_end_with_run",
]


def refuse_flattened_shards(trainer: Trainer, owner: str) -> None:
    """Raises ``NotImplementedError`` for DeepSpeed and Lightning's FSDP1, whose parameter shards are not matrices.

    Args:
        trainer: The trainer whose strategy is checked.
        owner: Who refuses (named in the message).
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        raise NotImplementedError(
            f"{owner} does not support {name}: DeepSpeed partitions the parameters and wraps their updates, while an "
            "edit writes whole matrices in closed form. Use strategy='ddp', or ModelParallelStrategy to shard the "
            "model (FSDP2)."
        )
    if isinstance(strategy, FSDPStrategy):
        raise NotImplementedError(
            f"{owner} does not support {name}: it wraps the model in FSDP1, whose flattened parameter shards an edit "
            "cannot address as matrices. Shard with FSDP2 instead: strategy "
            "lightning.pytorch.strategies.ModelParallelStrategy (configs/llama2-7b/rome-fsdp.yaml), or use "
            "strategy='ddp' when the model fits one device."
        )


def strategy_kind(trainer: Trainer, owner: str = "SequentialEditor") -> str:
    """``"replicas"`` (a ``DDPStrategy``) or ``"shards"`` (``ModelParallelStrategy``: FSDP2) for a multi-process
    run; any other strategy is refused with a ``NotImplementedError``.

    Args:
        trainer: A trainer with ``world_size > 1``.
        owner: Who refuses (named in the message).
    """
    refuse_flattened_shards(trainer, owner)
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        return "shards"
    if isinstance(strategy, DDPStrategy):
        return "replicas"
    raise NotImplementedError(
        f"{owner} runs on {trainer.world_size} processes only under a DDPStrategy ('ddp', 'ddp_spawn', ...: a whole "
        f"replica of the model on every rank) or ModelParallelStrategy (FSDP2 shards); got {type(strategy).__name__}."
    )


def fsdp_mesh(mesh: Any) -> Any:
    """The mesh to shard over, from ModelParallelStrategy's ``(data_parallel, tensor_parallel)`` mesh: the one
    dimension larger than 1 (all processes), or both - replicated across the first, sharded within the second (HSDP).
    """
    data, shards = mesh["data_parallel"], mesh["tensor_parallel"]
    if shards.size() == 1:
        return data
    if data.size() == 1:
        return shards
    return mesh


class NoUpdates(torch.optim.SGD):
    """An optimizer that changes nothing: edits are closed-form writes. Its ``step()`` advances ``global_step``
    (as the mock optimizer's does) and counts itself in its state - a state Lightning's sharded checkpoints can save
    and load (an empty one they cannot load).

    Args:
        params: One parameter is enough (its state holds the count).
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__(params, lr=0.0)
        for group in self.param_groups:
            for param in group["params"]:
                # One dimension, on the parameter's device: torch's loader of a whole (rank-0) optimizer state
                # broadcasts its tensors from there and finds the device by the non-scalar ones.
                self.state[param]["step"] = torch.zeros(1, dtype=torch.float32, device=param.device)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for state in self.state.values():
            state["step"] += 1
        return None


def workers_end_with_run(trainer: Trainer) -> bool:
    """Whether the processes of this run end with it (``ddp_spawn`` / ``ddp_fork``), not with the script."""
    return getattr(trainer.strategy, "_start_method", "popen") != "popen"


def check_same_batch(batch: Sequence, batch_idx: int) -> None:
    """Raises on every rank if the ranks received different requests (a loader split by a distributed sampler)."""
    if not distributed.same_on_all_ranks(list(batch)):
        raise RuntimeError(
            f"The ranks received different edit batches at batch {batch_idx}: sequential editing needs every rank "
            "to edit the same requests in the same order (a distributed sampler split the stream?). Use "
            "EditDataModule, whose train loader is never split, or give every rank the whole stream."
        )


def broadcast_updates(updates: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's updates on every rank: each rank computed the same ones, up to the last bits of its own arithmetic.

    Args:
        updates: Parameter name -> :class:`~prune_lightning.spectral.LowRankUpdate` or dense tensor.
    """
    out: dict[str, Any] = {}
    for name in sorted(updates):
        update = updates[name]
        if isinstance(update, LowRankUpdate):
            left, right = update.left, update.right
            if left.dtype == right.dtype and left.device == right.device:
                flat = distributed.broadcast_(torch.cat([left.reshape(-1), right.reshape(-1)]))
                left, right = flat[: left.numel()].view_as(left), flat[left.numel():].view_as(right)
            else:
                left, right = distributed.broadcast_(left.clone()), distributed.broadcast_(right.clone())
            out[name] = LowRankUpdate(left, right)
        else:
            out[name] = distributed.broadcast_(update.detach().clone())
    return out


def drop_ddp_anchor(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the DDP anchor parameter is not part of the model and never saved."""
    state_dict.pop(prefix + "ddp_anchor", None)


def ignore_ddp_anchor(module: nn.Module, incompatible_keys: Any) -> None:
    """Load hook: a module with the DDP anchor loads checkpoints without it."""
    keys = incompatible_keys.missing_keys
    keys[:] = [key for key in keys if key != "ddp_anchor" and not key.endswith(".ddp_anchor")]


def broadcast_restraint(tracker: DeltaTracker, values: Optional[dict[str, float]], src: int) -> dict[str, float]:
    """Rank ``src``'s restraint of one matrix on every rank: its logged values and, if it changed, its update.

    Args:
        tracker: This rank's tracker of the matrix; rank ``src`` restrained its own, the others receive it.
        values: What ``restrain_matrix`` returned on rank ``src`` (``None`` elsewhere).
        src: The rank that restrained the matrix.
    """
    mine = distributed.rank() == src
    header: list[Any] = [None]
    if mine:
        layout = None
        if values.get("changed", 1.0):
            state = tracker.state_dict()
            columns = state["left"].shape[1] if state["mode"] == "lowrank" else 0
            layout = (state["mode"], columns, state["compressed_columns"])
        header = [{"values": values, "layout": layout}]
    dist.broadcast_object_list(header, src=src)  # a few floats and ints
    values, layout = header[0]["values"], header[0]["layout"]
    if layout is None:
        return values
    mode, columns, compressed = layout
    m, n = tracker.shape
    if mode == "lowrank":
        if mine:
            left, right = tracker.factors()
            flat = torch.cat([left.reshape(-1), right.reshape(-1)])
        else:
            flat = torch.empty((m + n) * columns, dtype=tracker.dtype, device=tracker.device)
        distributed.broadcast_(flat, src=src)
        if not mine:
            tracker.load_state_dict({"shape": [m, n], "mode": "lowrank", "compressed_columns": compressed,
                                     "left": flat[: m * columns].view(m, columns),
                                     "right": flat[m * columns:].view(n, columns)})
    elif mode == "dense":
        delta = tracker.dense() if mine else torch.empty(m, n, dtype=tracker.dtype, device=tracker.device)
        distributed.broadcast_(delta, src=src)
        if not mine:
            tracker.load_state_dict({"shape": [m, n], "mode": "dense", "delta": delta})
    elif not mine:
        tracker.load_state_dict({"shape": [m, n], "mode": "empty"})
    return values
