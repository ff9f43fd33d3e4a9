"""The stream of edit requests that ``Trainer.fit`` walks: ordered, never shuffled, resumable mid-epoch.

One batch is one edit batch: a plain ``list[EditRequest]`` (``batch_size`` requests, fewer at the end), served in
file order. ``val_dataloader`` / ``test_dataloader`` serve the same requests, for evaluating the edits.

Resuming. Sequential editing is a walk over the stream in which every step changes the model for good, so a fit
resumed from a checkpoint taken after ``k`` edit batches must continue with batch ``k + 1`` - re-editing or
skipping a fact would change the result. The train loader is a *stateful* ``DataLoader`` in Lightning's sense
(it has ``state_dict`` / ``load_state_dict``), which Lightning (2.x) handles like this:

- saving: ``FitLoop.on_save_checkpoint`` stores ``loader.state_dict()`` in the checkpoint (``loops.fit_loop.
  state_dict.combined_loader``). The loader records how many batches have been *edited* -
  ``fit_loop.epoch_loop.batch_progress.current.processed``, the number of ``training_step`` calls that
  returned in this epoch - not how many it has yielded, because the fetcher prefetches a batch ahead.
  (``completed`` would be one short for checkpoints written in ``on_train_batch_end``, where ``ModelCheckpoint``
  writes them: ``completed`` is only incremented after that hook.)
- restoring: ``Trainer.fit(ckpt_path=...)`` restores the loops (``Trainer._run``:
  ``restore_training_state``) before ``FitLoop.run`` calls ``setup_data()``, which requests the train loader; ``setup_data`` then calls ``loader.load_state_dict(...)`` (only when the fit loop is restarting
  mid-epoch) before it creates the iterator, and the loader's next iteration starts at the first batch not yet
  edited. The loader keeps its full length, so Lightning's own counters (``batch_idx``, the end-of-epoch test
  ``ready == num_training_batches``) stay right; a loader that simply left out the edited batches would end the
  resumed epoch early whenever fewer than half of the batches were done.

Several processes. Sequential editing is order-dependent, so under DDP every rank must edit *every* request, in
order (see :mod:`prune_lightning.distributed`). Lightning replaces the sampler of a loader with a
``DistributedSampler`` that splits it across the ranks unless the loader's sampler already is one; both samplers
here therefore are ``DistributedSampler`` subclasses by type - which keeps Lightning away whatever
``Trainer(use_distributed_sampler=...)`` says - and decide the indices themselves: the train loader gives every rank
the whole stream (and resumes as above); the validate / test loaders give each rank its shard of the requests
(``rank::world_size``, never padded with repeats, so the summed edit-quality metrics count every request once;
the shorter shards end in empty padding, so that every rank runs as many evaluation steps).

The datamodule's own ``state_dict`` holds a fingerprint of the stream (source, format, offset, limit, batch size,
number of requests and a digest of their content); resuming with a different stream is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from prune_lightning.data.counterfact import read_counterfact
from prune_lightning.data.requests import EditRequest
from prune_lightning.data.sources import HUB_PREFIX, resolve_source
from prune_lightning.data.zsre import ZSRE_TARGETS, read_zsre

__all__ = ["EditDataModule", "read_requests", "FORMATS"]

FORMATS = ("counterfact", "zsre")


def read_requests(
    format: str,
    source: Union[str, Path, Any],
    limit: Optional[int] = None,
    offset: int = 0,
    zsre_target: str = "answers",
    allow_http: bool = False,
    revision: Optional[str] = None,
) -> list[EditRequest]:
    """Reads edit requests in one of the known formats.

    Args:
        format: ``"counterfact"`` or ``"zsre"``.
        source: Local file, ``http(s)://`` URL, ``hub:<id>[:<config>][@<split>]`` or ``datasets.Dataset``.
        limit: Maximum number of requests (``None``: all).
        offset: Number of records to skip first.
        zsre_target: For zsRE, ``"answers"`` (ROME/MEMIT) or ``"alt"`` (EasyEdit) as the new target.
        allow_http: Accept a plain ``http://`` URL.
        revision: The revision (branch, tag or commit) of a hub dataset.
    """
    if format == "counterfact":
        return read_counterfact(source, limit=limit, offset=offset, allow_http=allow_http, revision=revision)
    if format == "zsre":
        return read_zsre(source, target=zsre_target, limit=limit, offset=offset, allow_http=allow_http,
                         revision=revision)
    raise ValueError(f"Unknown request format {format!r}; expected one of {FORMATS}")


def _collate(batch: list[Optional[EditRequest]]) -> list[EditRequest]:
    """One batch is one edit batch: the requests themselves, in order (an evaluation shard's padding left out)."""
    return [request for request in batch if request is not None]


class _PaddedRequests(Sequence):
    """The requests, and ``None`` for any index past them: the padding of an evaluation shard."""

    def __init__(self, requests: Sequence[EditRequest]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> Optional[EditRequest]:
        return self.requests[index] if index < len(self.requests) else None


class _OrderedSampler(DistributedSampler):
    """Indices in order, never shuffled: ``rank, rank + world_size, ...`` of ``0 .. n - 1``; with ``pad``, followed by
    the index ``n`` (past the end) until every rank has ``ceil(n / world_size)``.

    A ``DistributedSampler`` by type only, so that Lightning does not put one of its own in its place (it leaves
    loaders whose sampler is one alone); the constructor of ``DistributedSampler`` - which asks
    ``torch.distributed`` for the rank - is not called. ``set_epoch`` (Lightning calls it) changes nothing.

    Args:
        num_items: Length of the dataset.
        rank: This rank's shard (``0`` with ``world_size=1``: everything).
        world_size: Number of shards.
        pad: Give every rank as many indices.
    """

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, pad: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_items = num_items
        self.rank = rank
        self.num_replicas = world_size
        self.shuffle = False
        self.drop_last = False
        self.seed = 0
        self.epoch = 0
        self.num_samples = -(-num_items // world_size) if pad else len(range(rank, num_items, world_size))
        self.total_size = num_items

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        own = range(self.rank, self.num_items, self.num_replicas)
        # Padding: indices past the end (``_PaddedRequests`` gives None for them, ``_collate`` drops them).
        return itertools.chain(own, itertools.repeat(self.num_items, self.num_samples - len(own)))


class _ResumableSampler(_OrderedSampler):
    """Indices ``0 .. n - 1`` in order, on every rank; after :meth:`start_at` the next iteration (only) begins later.

    ``len`` stays ``n`` so that the loader's length - and Lightning's batch accounting - never changes.
    """

    def __init__(self, num_items: int) -> None:
        super().__init__(num_items)
        self._start = 0

    def start_at(self, index: int) -> None:
        self._start = index

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(range(start, self.num_items))


class _EditLoader(DataLoader):
    """The train loader: ordered batches of requests that resume after the last edited batch.

    Lightning treats any loader with ``state_dict`` / ``load_state_dict`` as resumable and stores its state in
    the fit loop's checkpoint. ``batches_done`` reports how many batches were edited (see the module docstring);
    without it, or while it reports ``None`` (no Trainer attached), the state says that no batch was edited.

    Args:
        requests: The requests, in order.
        batch_size: Requests per edit batch.
        num_workers: DataLoader worker processes.
        batches_done: Returns the number of batches of the current epoch that were edited.
    """

    def __init__(
        self,
        requests: list[EditRequest],
        batch_size: int,
        num_workers: int = 0,
        batches_done: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        sampler = _ResumableSampler(len(requests))
        super().__init__(
            requests, batch_size=batch_size, sampler=sampler, collate_fn=_collate, num_workers=num_workers
        )
        self._batches_done = batches_done
        self._resume_sampler = sampler

    def state_dict(self) -> dict[str, int]:
        """How many batches of this epoch were edited, and the shape of the stream."""
        done = self._batches_done() if self._batches_done is not None else None
        return {"batches_done": int(done or 0), "num_batches": len(self), "batch_size": int(self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Makes the next iteration start with the first batch not yet edited.

        Args:
            state_dict: What :meth:`state_dict` returned when the checkpoint was written.
        """
        done = int(state_dict.get("batches_done", 0))
        same_shape = (
            state_dict.get("num_batches", len(self)) == len(self)
            and state_dict.get("batch_size", self.batch_size) == self.batch_size
        )
        if not same_shape:
            raise ValueError(
                f"Cannot resume the edit stream: the checkpoint's loader had {state_dict.get('num_batches')} batches"
                f" of {state_dict.get('batch_size')} requests, this one has {len(self)} of {self.batch_size}"
            )
        if self.sampler is not self._resume_sampler:
            raise RuntimeError(
                "Cannot resume the edit stream: its sampler was replaced (a distributed sampler?). "
                "Sequential editing needs every request, in order, on every process."
            )
        # A checkpoint written when the epoch's last batch was edited starts the next epoch from the beginning.
        self._resume_sampler.start_at(done * self.batch_size if 0 < done < len(self) else 0)


class EditDataModule(LightningDataModule):
    """Serves edit requests in file order, one edit batch per training step; resumes after the last edited batch.

    Args:
        source: Where the records are: a local ``.json`` / ``.jsonl`` file, an ``https://`` URL (downloaded once
            and cached; ``#sha256=<hex>`` pins its content), or a Hugging Face dataset written
            ``hub:<dataset_id>[:<config>][@<split>]``.
        format: Record schema: ``"counterfact"`` or ``"zsre"`` (MEND's split).
        batch_size: Requests per edit batch (1 for ROME; MEMIT edits many facts at once).
        limit: Use at most this many requests (``None``: all).
        offset: Skip this many records at the start of the source.
        zsre_target: For zsRE, the new target: ``"answers"`` (``answers[0]``, the ROME/MEMIT convention) or
            ``"alt"`` (the EasyEdit convention).
        num_workers: DataLoader worker processes (requests are small; 0 is usually best).
        allow_http: Accept a plain ``http://`` URL as the source (refused by default: use https, or pin the content
            with ``#sha256=<hex>``).
        revision: The revision (branch, tag or commit) of a hub dataset source; recorded in the saved config.
    """

    def __init__(
        self,
        source: str,
        format: str = "counterfact",
        batch_size: int = 1,
        limit: Optional[int] = None,
        offset: int = 0,
        zsre_target: str = "answers",
        num_workers: int = 0,
        allow_http: bool = False,
        revision: Optional[str] = None,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if zsre_target not in ZSRE_TARGETS:
            raise ValueError(f"zsre_target must be one of {ZSRE_TARGETS}, got {zsre_target!r}")
        checks = (("batch_size", batch_size, 1), ("offset", offset, 0), ("num_workers", num_workers, 0))
        for name, value, lowest in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        self.source = source
        self.format = format
        self.batch_size = batch_size
        self.limit = limit
        self.offset = offset
        self.zsre_target = zsre_target
        self.num_workers = num_workers
        self.allow_http = bool(allow_http)
        self.revision = revision
        self._requests: Optional[list[EditRequest]] = None

    # ----------------------------------------------------------------------------------------------------------------
    # data
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[EditRequest]:
        """All requests of the stream, in order (read on first use)."""
        if self._requests is None:
            self._requests = read_requests(
                self.format, self.source, limit=self.limit, offset=self.offset, zsre_target=self.zsre_target,
                allow_http=self.allow_http, revision=self.revision,
            )
        return self._requests

    def prepare_data(self) -> None:
        """Downloads a URL or hub source into its cache (Lightning calls this on one process per node)."""
        if isinstance(self.source, str) and self.source.startswith(("http://", "https://", HUB_PREFIX)):
            resolve_source(self.source, allow_http=self.allow_http, revision=self.revision)

    def setup(self, stage: str) -> None:
        """Reads the requests, so that a malformed file fails before any edit, and checks that they fit the model.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        """
        if not self.requests:
            rank_zero_warn(f"EditDataModule: no requests in {self.source!r} (offset={self.offset}, limit={self.limit})")
        # Before any output of the run: the datamodule's setup runs before the callbacks' (config.yaml) and the
        # module's. The module says what fits its model (SequentialEditor.check_requests).
        module = self.trainer.lightning_module if self.trainer is not None else None
        check = getattr(module, "check_requests", None)
        if callable(check):
            check(self.requests)

    def _batches_edited(self) -> Optional[int]:
        trainer = self.trainer
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        """Edit batches in order - the whole stream on every rank; after a mid-epoch resume, from the first batch not
        yet edited."""
        return _EditLoader(self.requests, self.batch_size, self.num_workers, batches_done=self._batches_edited)

    def _eval_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Every rank gets as many batches (the shorter shards end in padding, dropped by the collate function): the
        # loop runs on every rank, also one without a request, so the scores' sums across ranks meet, and on a
        # sharded model every rank runs its forwards alongside the others'.
        sampler = _OrderedSampler(len(self.requests), rank=rank, world_size=world_size, pad=True)
        return DataLoader(
            _PaddedRequests(self.requests), batch_size=self.batch_size, sampler=sampler, collate_fn=_collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """The same requests in the same batches (on several processes: each rank its shard), to measure how well
        they were edited."""
        return self._eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The same requests in the same batches (on several processes: each rank its shard), to measure how well
        they were edited."""
        return self._eval_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """A batch holds strings only: nothing to move (Lightning's default would try to rebuild the frozen
        dataclasses and fail)."""
        return batch

    # ----------------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for request in self.requests:
            content = {k: v for k, v in request.to_dict().items() if k not in ("source", "index")}
            digest.update(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
        return {
            "source": str(self.source),
            "format": self.format,
            "zsre_target": self.zsre_target if self.format == "zsre" else None,
            "offset": self.offset,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "count": len(self.requests),
            "digest": digest.hexdigest(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The fingerprint of the request stream, checked on resume."""
        return {"fingerprint": self._fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses to resume on a different request stream.

        The stream is the same when it holds the same requests (count and content digest) in the same batches;
        a source given under another name (a moved file, a URL instead of its local copy) only warns.

        Args:
            state_dict: What :meth:`state_dict` returned when the checkpoint was written.
        """
        saved = state_dict.get("fingerprint")
        if saved is None:
            return
        current = self._fingerprint()
        # offset / limit / source only name the stream; count and digest say what it holds
        decisive = ("format", "zsre_target", "batch_size", "count", "digest")
        changed = [key for key in decisive if saved.get(key) != current.get(key)]
        if changed:
            details = "; ".join(
                f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in changed
            )
            raise ValueError(
                f"Cannot resume: the checkpoint was written for a different stream of edit requests ({details}). "
                "Resume with the same data settings, or start a new fit without ckpt_path."
            )
        if saved.get("source") != current["source"]:
            rank_zero_warn(
                f"Resuming with source {current['source']!r} instead of {saved.get('source')!r}; "
                "the requests are identical, so the edits continue."
            )
