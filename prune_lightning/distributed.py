r"""Sequential editing on several processes: what is replicated, what is spread, and the collectives that do it.

Sequential editing is order-dependent: edit ``n + 1`` is computed on the model that edits ``1 .. n`` made. A
data-parallel run in which every rank edits different requests therefore computes a different model on every rank
(the replicas drift apart), and no reduction of their updates gives the single-process result. So under DDP

- **every rank holds the whole model and walks the whole request stream, in order** (``EditDataModule``'s train
  loader is never split by a distributed sampler);
- **the work inside one edit step is spread**: the rows of ROME's key and value optimisation (one per context
  template, plus the KL prompt) are split across the ranks (rank ``r`` takes rows ``r, r + world, ...``); every rank
  computes its rows' part of the loss and of the gradient of ``delta``, the parts are summed with
  ``all_reduce``, and every rank takes the same Adam step - the single-process optimisation, to float tolerance;
- **every rank ends every step with identical weights**: the update factors the editor returns are broadcast from
  rank 0 before they are written, and the callbacks that rewrite or measure the matrices (PRUNE, RECT, the
  condition-number monitor) give the same result on every rank (see their docstrings for how);
- **evaluation is sharded**: evaluators score ``examples[rank::world]`` and sum their torchmetrics states across
  ranks.

A sharded model (FSDP2, ``ModelParallelStrategy``) adds one rule: every forward is a collective (each layer
all-gathers its weights), so all ranks must run the same number of forwards and backwards. Editing keeps it with an
even split (``split_work(even=True)``): ROME's rows are dealt out as under DDP, and a rank with fewer rows pads its
batch to as many with rows whose loss is not counted, so every rank runs the same forwards and backwards. Sharded
evaluation keeps it with :func:`lockstep`, which pairs each rank's forwards with the other ranks' and lets a rank
that has finished its shard run stand-in forwards until the others have finished theirs.

Editors see the split through :func:`current_split`, which is the trivial one-process :class:`WorkSplit` except
inside :func:`split_work` (``SequentialEditor`` enters it around ``editor.compute_update`` when it runs on several
processes). So an editor called directly - in a notebook, in a test, on one rank of a job - computes everything
itself and never waits for other ranks.

Large tensors move with ``torch.distributed`` collectives on tensors (``trainer.strategy.broadcast`` pickles: 1.0 s
for a 4096 x 11008 matrix against 57 ms with ``torch.distributed.broadcast``, STACK.md). Under NCCL a CPU tensor
travels through the current CUDA device and is copied back.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "WorkSplit",
    "all_reduce_max_",
    "all_reduce_sum_",
    "broadcast_",
    "current_split",
    "is_distributed",
    "lockstep",
    "rank",
    "same_on_all_ranks",
    "shard",
    "shard_indices",
    "split_work",
    "world_size",
]

T = TypeVar("T")


def is_distributed(group: Any = None) -> bool:
    """Whether a process group with more than one process is initialized (``group``: default, the world)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


_process_rank, _process_count = rank, world_size  # for the functions below whose arguments shadow these names


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The indices of ``n`` items that rank ``rank`` of ``world_size`` takes: ``rank, rank + world_size, ...``.

    Every index belongs to exactly one rank; ranks beyond ``n - 1`` get none.

    Args:
        n: Number of items.
        rank: This rank, in ``[0, world_size)``.
        world_size: Number of ranks, ``>= 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))


def shard(items: Sequence[T], rank: Optional[int] = None, world_size: Optional[int] = None) -> list[T]:
    """``items[rank::world_size]``: this rank's share of a sequence (default: the process group's rank and size).

    Args:
        items: Any sequence (examples, requests, rows).
        rank: Default: this process's rank.
        world_size: Default: the number of processes.
    """
    rank = _process_rank() if rank is None else rank
    world_size = _process_count() if world_size is None else world_size
    return [items[i] for i in shard_indices(len(items), rank, world_size)]


def _collective_device(group: Any) -> Optional[torch.device]:
    """The device tensors must be on for ``group``'s backend (NCCL: the current CUDA device), or ``None``: any."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextlib.contextmanager
def _as_collective_tensor(tensor: torch.Tensor, group: Any) -> Iterator[torch.Tensor]:
    """A contiguous tensor on the backend's device standing in for ``tensor``; copied back into it on exit."""
    device = _collective_device(group)
    moved = device is not None and tensor.device != device
    if not moved and tensor.is_contiguous():
        yield tensor
        return
    proxy = tensor.to(device if moved else tensor.device).contiguous()
    yield proxy
    tensor.copy_(proxy)


def all_reduce_sum_(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sums ``tensor`` over the ranks of ``group``, in place; every rank receives the same bytes. No-op when not
    distributed. Returns ``tensor``."""
    return _all_reduce_(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max_(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over the ranks of ``group``, in place. No-op when not distributed.
    Returns ``tensor``."""
    return _all_reduce_(tensor, dist.ReduceOp.MAX, group)


def _all_reduce_(tensor: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if is_distributed(group):
        with _as_collective_tensor(tensor, group) as proxy:
            dist.all_reduce(proxy, op=op, group=group)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """Overwrites ``tensor`` with rank ``src``'s (a rank within ``group``), in place. No-op when not distributed.
    Every rank must pass a tensor of the same shape and dtype. Returns ``tensor``."""
    if is_distributed(group):
        source = src if group is None or group is dist.group.WORLD else dist.get_global_rank(group, src)
        with _as_collective_tensor(tensor, group) as proxy:
            dist.broadcast(proxy, src=source, group=group)
    return tensor


def same_on_all_ranks(obj: Any, group: Any = None) -> bool:
    """Whether every rank of ``group`` passed an equal ``obj`` (compared by a SHA-256 digest of its ``repr``); one
    small collective, the same answer on every rank. ``True`` when not distributed.

    Args:
        obj: Anything with a deterministic ``repr`` (a batch of ``EditRequest``, a list of strings).
        group: A ``torch.distributed`` process group (``None``: the default group).
    """
    if not is_distributed(group):
        return True
    digest = int.from_bytes(hashlib.sha256(repr(obj).encode("utf-8")).digest()[:7], "big")
    extremes = all_reduce_max_(torch.tensor([digest, -digest], dtype=torch.int64), group)
    return int(extremes[0]) == -int(extremes[1])


@dataclass(frozen=True)
class WorkSplit:
    """How the work of one edit step is split: this rank's index, the number of ranks, their process group.

    The default instance is one process doing everything; its collectives do nothing.

    Args:
        rank: This process's rank in ``group``.
        world_size: Number of processes sharing the work.
        group: The ``torch.distributed`` process group (``None``: the default group).
        even: Every rank runs as many rows (:meth:`padded_rows`), some of them padding: needed where each forward
            and backward is a collective, as on a sharded (FSDP) model.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    even: bool = False

    @property
    def active(self) -> bool:
        """Whether the work is shared with other processes."""
        return self.world_size > 1

    def rows(self, n: int) -> list[int]:
        """This rank's rows of ``n``: ``rank, rank + world_size, ...`` (all of them on one process)."""
        return shard_indices(n, self.rank, self.world_size)

    def padded_rows(self, n: int) -> int:
        """How many rows of ``n`` this rank runs: its own (:meth:`rows`), and with ``even`` as many as the rank with
        the most (``ceil(n / world_size)``), the difference being padding rows that add nothing to any result."""
        return -(-n // self.world_size) if self.even else len(self.rows(n))

    def owner(self, index: int) -> int:
        """The rank that takes row ``index``."""
        return index % self.world_size

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks, in place (nothing to do on one process)."""
        return all_reduce_sum_(tensor, self.group) if self.active else tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites ``tensor`` with rank ``src``'s, in place (nothing to do on one process)."""
        return broadcast_(tensor, src, self.group) if self.active else tensor


_ONE_PROCESS = WorkSplit()
_current: WorkSplit = _ONE_PROCESS


def current_split() -> WorkSplit:
    """The split editors follow now: the one :func:`split_work` set up, else one process doing everything."""
    return _current


@contextlib.contextmanager
def split_work(group: Any = None, even: bool = False) -> Iterator[WorkSplit]:
    """Inside, :func:`current_split` spreads the work over the ranks of ``group`` (default: all processes).

    Every rank of the group must enter it around the same editor call with the same requests: the editor then runs
    collectives that each rank has to join. Outside a process group, or with one process, the split is trivial.

    Args:
        group: A ``torch.distributed`` process group, or ``None`` for the default group.
        even: Every rank runs as many rows (a sharded model, whose forwards and backwards are collectives).
    """
    global _current
    previous = _current
    _current = WorkSplit(rank(group), world_size(group), group, even) if is_distributed(group) else _ONE_PROCESS
    try:
        yield _current
    finally:
        _current = previous


_lockstep_depth = 0


@contextlib.contextmanager
def lockstep(model: torch.nn.Module, group: Any = None) -> Iterator[None]:
    """Inside, the forwards of a sharded ``model`` stay paired across the ranks, whatever each rank runs.

    Under FSDP every forward of the model is a collective, so ranks that score shards of different sizes (or
    generate different numbers of tokens) would wait for each other forever. Here each forward of ``model`` first
    tells the other ranks that one is coming (an ``all_reduce`` of a flag); on leaving, a rank answers every forward
    the others still run with a stand-in forward of one token, until no rank has any left. Every rank must enter
    and leave it, also one with nothing to do. It nests (only the outermost one acts), and does nothing for a model
    that is not sharded or outside a process group.

    Args:
        model: The model whose forwards are paired (its root module; calls to it, and ``generate``, are seen).
        group: The process group (``None``: all processes).
    """
    global _lockstep_depth
    from prune_lightning.models import is_sharded_model

    if _lockstep_depth or not is_distributed(group) or not is_sharded_model(model):
        _lockstep_depth += 1
        try:
            yield
        finally:
            _lockstep_depth -= 1
        return
    device = next(model.parameters()).device
    standing_in = False

    def announce(_module: Any, _args: Any) -> None:
        if not standing_in:
            all_reduce_max_(torch.ones(1, dtype=torch.int64, device=device), group)

    handle = model.register_forward_pre_hook(announce, prepend=True)  # before FSDP's own pre-forward gathers
    _lockstep_depth += 1
    try:
        yield
        standing_in = True
        stand_in = torch.zeros(1, 1, dtype=torch.long, device=device)
        with torch.no_grad():
            while int(all_reduce_max_(torch.zeros(1, dtype=torch.int64, device=device), group)):
                model(input_ids=stand_in, use_cache=False)
    finally:
        _lockstep_depth -= 1
        handle.remove()
