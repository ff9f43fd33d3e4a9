"""The edits MEND's hypernetwork learns from: a shuffled, resumable stream of training edits and a fixed validation set.

One sample is one edit request with what the training loss needs beside it (:class:`MENDSample`):

- the prompt the *outer* edit loss is scored on: the request's own prompt (``edit_outer="prompt"``, EasyEdit's
  ``EditTrainer``, which the PRUNE paper used) or one of its paraphrases (``"paraphrase"``: MEND's own trainer scores
  the rephrased question, ``edit_outer``, when ``data.rephrase`` is on);
- one locality prompt and its answer: a ``neighborhood_prompts`` entry of the request with its
  ``neighborhood_targets`` entry (zsRE: the ``loc`` question and ``loc_ans``) or, for CounterFact, the request's
  ``target_true`` (the neighbours share the old object). EasyEdit pairs each training record with its own locality
  prompt in the same way. With ``loc``, the locality prompts come from a file of their own instead - unrelated
  inputs, as MEND's own trainer draws them from Natural Questions (zsRE) or OpenWebText (generation): records
  ``{"prompt": ..., "answer": ...}`` (a JSON list or JSON lines), one drawn per sample, never one that mentions the
  request's subject.

Requests are read with :func:`prune_lightning.data.read_requests` (CounterFact or zsRE; for zsRE the new target is
``alt`` by default, as in EasyEdit's ``ZsreDataset``). Every request needs at least one locality prompt.

Order and resuming. The training loader serves the requests in a permutation that depends only on ``seed`` and the
epoch, and draws each sample's paraphrase and locality prompt from ``(seed, epoch, index)``, so the same settings give
the same stream. Its state (batches done in the epoch) goes into Lightning's checkpoint; a fit resumed mid-epoch
continues with the next batch, so it ends with the weights of an uninterrupted fit. The validation loader serves
the first ``val_limit`` requests of ``val`` in file order, each with a fixed locality prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from prune_lightning.data import EditRequest, read_requests, resolve_source

__all__ = ["EDIT_OUTER", "MENDDataModule", "MENDSample", "make_sample", "read_locality"]

EDIT_OUTER = ("prompt", "paraphrase")


@dataclass(frozen=True)
class MENDSample:
    """One training or validation edit.

    Args:
        request: The edit.
        edit_prompt: Where the edited model's target NLL is scored (the request's prompt or a paraphrase).
        loc_prompt: An unrelated prompt whose next-token distributions the edit must keep.
        loc_target: Its answer (the positions that predict it are where the KL is taken).
    """

    request: EditRequest
    edit_prompt: str
    loc_prompt: str
    loc_target: str


def make_sample(request: EditRequest, rng: random.Random, edit_outer: str,
                locality: Optional[Sequence[tuple[str, str]]] = None) -> MENDSample:
    """The sample of ``request`` with its paraphrase and locality prompt drawn from ``rng`` (from ``locality``, the
    ``(prompt, answer)`` pairs of a locality file, when given)."""
    edit_prompt = request.rendered_prompt
    if edit_outer == "paraphrase" and request.paraphrase_prompts:
        edit_prompt = rng.choice(request.paraphrase_prompts)
    if locality:
        for _ in range(100):  # an unrelated input: not about the edited subject
            loc_prompt, loc_target = locality[rng.randrange(len(locality))]
            if request.subject not in loc_prompt:
                break
        return MENDSample(request, edit_prompt, loc_prompt, loc_target)
    j = rng.randrange(len(request.neighborhood_prompts))
    loc_target = request.neighborhood_targets[j] if request.neighborhood_targets else request.target_true
    return MENDSample(request, edit_prompt, request.neighborhood_prompts[j], loc_target)


def read_locality(source: str) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs from a JSON list or JSON-lines file of ``{"prompt": ..., "answer": ...}`` records
    (a local path, an ``http(s)://`` URL or ``hub:<id>``).

    Raises:
        ValueError: For a record without a non-empty string ``prompt`` or ``answer``, naming the file and the index.
    """
    resolved = resolve_source(source)
    if isinstance(resolved, Path):
        text = resolved.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:  # a datasets.Dataset
        records = list(resolved)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: a locality file holds a non-empty list of {{'prompt', 'answer'}} records")
    pairs = []
    for index, record in enumerate(records):
        for key in ("prompt", "answer"):
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source}: record {index}: field '{key}' must be a non-empty string, got {value!r}")
        pairs.append((record["prompt"], record["answer"].strip()))
    return pairs


class _TrainSamples(Dataset):
    """Item ``epoch * n + i``: request ``i`` with the prompts drawn for that epoch."""

    def __init__(self, requests: list[EditRequest], seed: int, edit_outer: str,
                 locality: Optional[list[tuple[str, str]]]) -> None:
        self.requests, self.seed, self.edit_outer, self.locality = requests, seed, edit_outer, locality

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, code: int) -> MENDSample:
        epoch, index = divmod(int(code), len(self.requests))
        rng = random.Random(f"mend-train-{self.seed}-{epoch}-{index}")
        return make_sample(self.requests[index], rng, self.edit_outer, self.locality)


class _ShuffledSampler(Sampler):
    """A seeded permutation per epoch (Lightning calls :meth:`set_epoch`), as item codes ``epoch * n + i``; after
    :meth:`start_at` the next iteration (only) begins later. Its length stays ``n``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self._start = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at(self, index: int) -> None:
        self._start = index

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)[start:]
        return iter((order + self.epoch * self.n).tolist())


def _collate(samples: list[MENDSample]) -> list[MENDSample]:
    return list(samples)


class _TrainLoader(DataLoader):
    """The training loader; Lightning stores :meth:`state_dict` in its checkpoints and resumes it mid-epoch."""

    def __init__(self, samples: _TrainSamples, batch_size: int, seed: int, num_workers: int,
                 batches_done: Callable[[], Optional[int]]) -> None:
        sampler = _ShuffledSampler(len(samples), seed)
        super().__init__(samples, batch_size=batch_size, sampler=sampler, collate_fn=_collate,
                         num_workers=num_workers, drop_last=True)
        self._shuffled = sampler
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self._batches_done() or 0), "num_batches": len(self),
                "batch_size": int(self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict.get("num_batches"), state_dict.get("batch_size")) != (len(self), self.batch_size):
            raise ValueError(f"Cannot resume MEND training: the checkpoint's loader had "
                             f"{state_dict.get('num_batches')} batches of {state_dict.get('batch_size')} edits, "
                             f"this one has {len(self)} of {self.batch_size}")
        done = int(state_dict.get("batches_done", 0))
        self._shuffled.start_at(done * self.batch_size if 0 < done < len(self) else 0)


class MENDDataModule(LightningDataModule):
    """Training and validation edits for :class:`~prune_lightning.mend.MENDTrainer`.

    Args:
        train: The training requests: a local ``.json`` / ``.jsonl`` file, an ``http(s)://`` URL or ``hub:<id>``.
        val: The validation requests (``None``: no validation).
        loc: Locality prompts of their own (``{"prompt", "answer"}`` records; see the module docstring) instead of
            the requests' neighbourhood prompts.
        format: ``"counterfact"`` or ``"zsre"``.
        zsre_target: For zsRE, the new target: ``"alt"`` (EasyEdit's MEND training) or ``"answers"``.
        batch_size: Edits per training step, made at once (the references train with 1).
        val_batch_size: Edits per validation step, made at once (1: each request edited on its own).
        train_limit: Use at most this many training requests.
        val_limit: Use at most this many validation requests (the references' ``val_steps``: 500).
        edit_outer: Where the outer edit loss is scored: ``"prompt"`` (EasyEdit) or ``"paraphrase"`` (MEND).
        seed: Seeds the order and the drawn prompts.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: str,
        val: Optional[str] = None,
        loc: Optional[str] = None,
        format: str = "counterfact",
        zsre_target: str = "alt",
        batch_size: int = 1,
        val_batch_size: int = 1,
        train_limit: Optional[int] = None,
        val_limit: Optional[int] = 500,
        edit_outer: str = "prompt",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if edit_outer not in EDIT_OUTER:
            raise ValueError(f"edit_outer must be one of {EDIT_OUTER}, got {edit_outer!r}")
        for name, value, lowest in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                    ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
        for name, value in (("train_limit", train_limit), ("val_limit", val_limit)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        self.train, self.val, self.loc, self.format, self.zsre_target = train, val, loc, format, zsre_target
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.train_limit, self.val_limit, self.edit_outer = train_limit, val_limit, edit_outer
        self.seed, self.num_workers = int(seed), num_workers
        self._train: Optional[list[EditRequest]] = None
        self._val: Optional[list[EditRequest]] = None
        self._locality: Optional[list[tuple[str, str]]] = None

    def _read(self, source: str, limit: Optional[int]) -> list[EditRequest]:
        requests = read_requests(self.format, source, limit=limit, zsre_target=self.zsre_target)
        if not requests:
            raise ValueError(f"MENDDataModule: no requests in {source!r}")
        without = [r.case_id for r in requests if not r.neighborhood_prompts]
        if without and self.loc is None:
            raise ValueError(f"MENDDataModule: {source!r}: requests {without[:10]} have no neighborhood prompt; MEND's "
                             "locality loss needs one per request")
        return requests

    @property
    def locality(self) -> Optional[list[tuple[str, str]]]:
        if self._locality is None and self.loc is not None:
            self._locality = read_locality(self.loc)
        return self._locality

    @property
    def train_requests(self) -> list[EditRequest]:
        if self._train is None:
            self._train = self._read(self.train, self.train_limit)
        return self._train

    @property
    def val_requests(self) -> list[EditRequest]:
        if self._val is None:
            self._val = self._read(self.val, self.val_limit) if self.val is not None else []
        return self._val

    def setup(self, stage: str) -> None:
        """Reads the requests, so that a malformed file fails before training."""
        self.locality
        if stage == "fit":
            self.train_requests
        self.val_requests

    def _batches_done(self) -> Optional[int]:
        trainer = self.trainer
        return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        if len(self.train_requests) < self.batch_size:
            raise ValueError(f"MENDDataModule: {len(self.train_requests)} training requests, fewer than one batch of "
                             f"{self.batch_size}")
        samples = _TrainSamples(self.train_requests, self.seed, self.edit_outer, self.locality)
        return _TrainLoader(samples, self.batch_size, self.seed, self.num_workers, self._batches_done)

    def val_dataloader(self) -> Any:
        if not self.val_requests:
            return []
        samples = [make_sample(r, random.Random(f"mend-val-{self.seed}-{i}"), self.edit_outer, self.locality)
                   for i, r in enumerate(self.val_requests)]
        return DataLoader(samples, batch_size=self.val_batch_size, shuffle=False, collate_fn=_collate,
                          num_workers=self.num_workers)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """A batch holds strings only: nothing to move."""
        return batch
