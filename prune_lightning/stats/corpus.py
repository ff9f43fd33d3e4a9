"""The documents statistics are computed over, and their stream of padded batches.

Corpora are read as a stream, never loaded whole:

- a Hugging Face hub dataset ``"id[:config[:split]][@revision]"`` (split ``train`` by default; a revision - branch,
  tag or commit - pins the data, and being part of the spec it is recorded in the cache's metadata), streamed with
  ``datasets.load_dataset(..., streaming=True)``; the ``text`` column. :data:`REFERENCE_CORPUS`,
  ``"wikimedia/wikipedia:20231101.en"``, is what the editors' presets use; ``"wikitext:wikitext-103-raw-v1"`` is a
  smaller choice.
- ``path/to/file.txt``: one document per non-empty line.
- ``path/to/file.jsonl`` / ``.json``: records with a ``"text"`` field (JSON lines, or one JSON array), read with
  :func:`prune_lightning.io.json_records`.

The authors' statistics (``kmeng01/rome`` ``rome/layer_stats.py``) are over a seeded pseudorandom sample of 100,000
Wikipedia articles (dump ``20200501.en``, which today's ``datasets`` cannot load), cut to the model's context; here
they are the first ``n_samples`` articles of the stream. The two samples differ, so ``C`` differs by sampling noise.

The stream (:class:`CorpusStream`). The first ``n_samples`` non-empty documents, in order, tokenized on the fly and
cut to ``max_length`` tokens; an optional ``max_tokens`` budget ends it earlier (counted in stream order; the last
document is cut so that exactly ``max_tokens`` count). The stream is read in windows of ``sort_window`` steps; inside
a window the documents are ordered by length (as ROME's statistics code does), so a batch holds documents of similar
length and little padding. A window is cut into groups of ``batch_size * world_size`` documents, one group per step;
process ``r`` of ``world_size`` takes the documents at positions ``r, r + world_size, ...`` of each group, so every
process runs the same number of steps (the last group may leave a process an empty batch) and the set of documents -
hence ``C`` - does not depend on the number of processes, the batch size or the window (up to float rounding). Each
process reads the whole stream of *texts* (cheap) but tokenizes and runs only its share (with a token budget it
tokenizes every document, to know where the budget ends). The stream starts at a *cursor* (:data:`STREAM_START` or a
checkpoint's), which is how the statistics job resumes (:mod:`.job`).

Which documents were read. The cursor also carries ``sample_sha256``, a running digest of the documents in stream order
(``h_0 = ""``, ``h_i = sha256(h_{i-1} + sha256(document_i))``, hex; :func:`chain_digest`), which the job records with
the statistics: it names the exact sample even where the corpus has no revision or fingerprint (a streamed hub
dataset). Where ``datasets`` gives the loaded dataset a fingerprint (a non-streamed ``Dataset``), it travels in the
cursor as ``dataset_fingerprint``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prune_lightning.io import json_records, read_text
from prune_lightning.tokens import pad_id, pad_right

__all__ = [
    "REFERENCE_CORPUS",
    "STREAM_START",
    "CorpusLoader",
    "CorpusStream",
    "chain_digest",
    "corpus_name",
    "file_sha256",
    "iter_corpus_documents",
    "load_corpus_texts",
    "local_corpus_path",
    "parse_corpus_spec",
]

#: The corpus of the authors' statistics: English Wikipedia (``kmeng01/rome`` ``rome/layer_stats.py`` loads the
#: ``wikipedia`` dataset, dump ``20200501.en``, which today's ``datasets`` can no longer load; this is its successor).
REFERENCE_CORPUS = "wikimedia/wikipedia:20231101.en"

_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def iter_corpus_documents(corpus: str, info: Optional[dict[str, Any]] = None) -> Iterator[str]:
    """The non-empty documents of a corpus, in order, read as a stream.

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` (streamed) or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        info: Filled with what the source tells about itself once it is opened: ``dataset_fingerprint`` where
            ``datasets`` gives one.
    """
    local = local_corpus_path(corpus)
    texts = _local_texts(local) if local is not None else _hub_texts(str(corpus), info)
    for text in texts:
        if text and text.strip():
            yield text


def load_corpus_texts(corpus: str, n_samples: Optional[int] = None) -> list[str]:
    """The first ``n_samples`` non-empty documents of a corpus (all of them when ``n_samples`` is None).

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        n_samples: How many documents to return at most.
    """
    out: list[str] = []
    if n_samples is not None and n_samples <= 0:
        return out
    for text in iter_corpus_documents(corpus):
        out.append(text)
        if n_samples is not None and len(out) >= n_samples:
            break
    return out


def corpus_name(corpus: Union[str, Path]) -> str:
    """How a corpus is named in cache file names and metadata: a local file by its file name, a hub id as given."""
    local = local_corpus_path(corpus)
    return local.name if local is not None else str(corpus)


def parse_corpus_spec(corpus: Union[str, Path]) -> Optional[dict[str, str]]:
    """The parts of a hub corpus spec ``"id[:config[:split]][@revision]"``; None for a local file.

    Returns:
        ``{"dataset_id", "dataset_split"}`` plus ``"dataset_config"`` and ``"dataset_revision"`` where the spec gives
        them (the split defaults to ``train``).
    """
    if local_corpus_path(corpus) is not None:
        return None
    spec, _, revision = str(corpus).partition("@")
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    parts = {"dataset_id": name, "dataset_split": split or "train"}
    if config:
        parts["dataset_config"] = config
    if revision:
        parts["dataset_revision"] = revision
    return parts


def chain_digest(digest: Optional[str], text: str) -> Optional[str]:
    """The running digest of a sample after one more document: ``sha256(digest + sha256(text))`` (hex); None stays
    None (a stream resumed from a checkpoint that did not keep the digest)."""
    if digest is None:
        return None
    inner = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashlib.sha256((digest + inner).encode("ascii")).hexdigest()


def local_corpus_path(corpus: Union[str, Path]) -> Optional[Path]:
    """The corpus as a local file, or None for a hub dataset; a missing file with a known suffix is an error."""
    path = Path(corpus)
    if path.is_file():
        return path
    if path.suffix.lower() in _LOCAL_SUFFIXES:
        raise FileNotFoundError(f"Corpus file {str(corpus)!r} does not exist")
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_texts(path: Path) -> Iterable[str]:
    if path.suffix.lower() in (".jsonl", ".json"):
        for index, (_, record) in enumerate(json_records(path)):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}: record {index}: field 'text': missing or not a string")
            yield record["text"]
        return
    for line in read_text(path).splitlines():  # plain text: one document per line
        yield line.strip()


def _hub_texts(corpus: str, info: Optional[dict[str, Any]] = None) -> Iterable[str]:
    import datasets

    parts = parse_corpus_spec(corpus)
    try:
        dataset = datasets.load_dataset(parts["dataset_id"], parts.get("dataset_config"), split=parts["dataset_split"],
                                        streaming=True, revision=parts.get("dataset_revision"))
    except Exception as err:  # offline, unknown id, ...: say what to do instead
        raise RuntimeError(
            f"Could not load the statistics corpus {corpus!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Give a local .txt/.jsonl file as the corpus, or precomputed statistics as stats_file."
        ) from err
    fingerprint = getattr(dataset, "_fingerprint", None)  # datasets' own; a streamed dataset has none
    if info is not None and fingerprint:
        info["dataset_fingerprint"] = str(fingerprint)
    for index, row in enumerate(dataset):
        if "text" not in row:
            raise ValueError(f"Corpus {corpus!r}: record {index} has no 'text' column; columns: {sorted(row)}")
        yield row["text"]


STREAM_START = {"steps": 0, "documents": 0, "tokens": 0, "skip": 0, "finished": False}


class CorpusStream(IterableDataset):
    """Padded batches of one process's share of the first documents of a corpus, tokenized on the fly.

    Each item is one step: ``input_ids`` / ``attention_mask`` (right-padded), ``token_index`` (flat indices of the
    non-padding positions; empty when there is no padding), ``n_tokens``, ``n_documents`` (this process's) and
    ``cursor`` (where the whole stream stands after this step; see the module docstring). With DataLoader workers,
    worker ``w`` of ``n`` serves the steps ``w, w + n, ...``, which the loader interleaves back into order.

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        tokenizer: The model's tokenizer.
        n_samples: Number of documents (the first non-empty ones).
        batch_size: Documents per process and step.
        max_length: Truncation length in tokens.
        max_tokens: Token budget over all processes (None: none).
        rank: This process's index.
        world_size: Number of processes sharing the stream.
        start: The cursor to start from (default: the beginning).
        sort_window: Documents are ordered by length within windows of this many steps, to cut padding (1: stream
            order).
    """

    def __init__(
        self,
        corpus: str,
        tokenizer,
        n_samples: int,
        batch_size: int,
        max_length: int,
        max_tokens: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
        start: Optional[dict[str, Any]] = None,
        sort_window: int = 64,
    ) -> None:
        super().__init__()
        if int(sort_window) < 1:
            raise ValueError(f"sort_window must be >= 1, got {sort_window}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.corpus = str(corpus)
        self.tokenizer = tokenizer
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start = dict(STREAM_START, **(start or {}))
        self.sort_window = int(sort_window)
        self._pad_id = pad_id(tokenizer)
        self._available: Optional[int] = None

    def __len__(self) -> int:
        """Steps of the whole run, those before ``start`` included: exact for a local corpus without a token budget,
        an upper bound otherwise (a hub corpus is counted as ``n_samples`` documents)."""
        if self.start["finished"]:
            return int(self.start["steps"])
        if self._available is None:
            local = local_corpus_path(self.corpus)
            if local is None:
                self._available = self.n_samples
            else:
                self._available = sum(1 for _ in itertools.islice(iter_corpus_documents(self.corpus), self.n_samples))
        remaining = max(self._available - int(self.start["documents"]), 0)  # from the start of the current window
        done = int(self.start["steps"]) - int(self.start["skip"])
        return done + math.ceil(remaining / (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for index, (payload, cursor) in enumerate(self._steps()):
            if index % n_workers == worker_id:
                yield self._collate(payload, cursor)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def _groups(self) -> Iterator[tuple[tuple[str, list], dict[str, Any]]]:
        """``((kind, this process's texts or token ids), cursor after the group)`` for every group of documents.

        Windows of ``sort_window`` groups are read at once; inside a window the documents are ordered by length (of
        the text, a proxy of the token count; stable), so that a batch holds documents of similar length and little
        padding. The cursor of a group inside a window points at the window's start plus the groups done in it.
        """
        group = self.batch_size * self.world_size
        steps, documents, tokens, skip = (int(self.start[k]) for k in ("steps", "documents", "tokens", "skip"))
        steps -= skip  # the steps of the current window are counted again below, the done ones skipped
        if skip and (self.start.get("group"), self.start.get("window")) != (group, self.sort_window):
            raise ValueError(
                f"Cannot resume the statistics stream in the middle of a window of documents with batch_size x "
                f"processes = {group} and sort_window = {self.sort_window}: the checkpoint was written with "
                f"{self.start.get('group')} and {self.start.get('window')}. Resume with the same batch size, number of "
                "processes and sort_window."
            )
        # The digest of the documents before the cursor (a checkpoint written before it was kept has none).
        digest = self.start.get("sample_sha256", "" if documents == 0 else None)
        source: dict[str, Any] = {}
        docs = itertools.islice(iter_corpus_documents(self.corpus, source), documents, self.n_samples)
        while self.max_tokens is None or tokens < self.max_tokens:
            texts = list(itertools.islice(docs, group * self.sort_window))
            if not texts:
                return
            if self.max_tokens is None:
                items: list = texts
                window_tokens = tokens
            else:  # the budget is counted over the whole stream, in order, so every process tokenizes every text
                items = []
                window_tokens = tokens
                for ids in self._tokenize(texts):
                    if window_tokens >= self.max_tokens:
                        break
                    ids = ids[: self.max_tokens - window_tokens]
                    window_tokens += len(ids)
                    items.append(ids)
            window_digest = digest
            for text in texts[: len(items)]:  # in stream order, before the sort
                window_digest = chain_digest(window_digest, text)
            if self.sort_window > 1:
                items = sorted(items, key=len)  # stable: ties keep the stream order
            kind = "texts" if self.max_tokens is None else "ids"
            chunks = [items[i : i + group] for i in range(0, len(items), group)]
            for k, chunk in enumerate(chunks):
                steps += 1
                if k < skip:
                    continue
                if k == len(chunks) - 1:
                    cursor = {"documents": documents + len(items), "tokens": window_tokens, "skip": 0,
                              "sample_sha256": window_digest}
                else:
                    cursor = {"documents": documents, "tokens": tokens, "skip": k + 1, "sample_sha256": digest}
                yield (kind, chunk[self.rank :: self.world_size]), dict(cursor, steps=steps, group=group,
                                                                        window=self.sort_window, **source)
            skip = 0
            documents += len(items)
            tokens = window_tokens
            digest = window_digest

    def _steps(self) -> Iterator[tuple[tuple[str, list], dict[str, Any]]]:
        """:meth:`_groups` with ``cursor["finished"]`` set on the last one (one group of look-ahead)."""
        groups = self._groups()
        current = next(groups, None)
        while current is not None:
            following = next(groups, None)
            payload, cursor = current
            yield payload, dict(cursor, finished=following is None)
            current = following

    def _collate(self, payload: tuple[str, list], cursor: dict[str, Any]) -> dict[str, Any]:
        kind, items = payload
        seqs = [s for s in (self._tokenize(items) if kind == "texts" else items) if len(s) > 0]
        if seqs:
            input_ids, attention_mask = pad_right(seqs, self._pad_id)
        else:
            input_ids = attention_mask = torch.zeros((0, 0), dtype=torch.long)
        n_tokens = sum(len(s) for s in seqs)
        padded = n_tokens != input_ids.numel()
        token_index = attention_mask.flatten().nonzero().squeeze(1) if padded else torch.zeros(0, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_index": token_index,
            "n_tokens": n_tokens,
            "n_documents": len(items),
            "cursor": cursor,
        }


class CorpusLoader(DataLoader):
    """The train loader of the job; stateful in Lightning's sense, its state is the cursor of the last processed step.

    Args:
        stream: The job's :class:`CorpusStream` (already starting at the job's restored cursor).
        num_workers: DataLoader worker processes (they read and tokenize ahead).
        pin_memory: Pin batches for a faster copy to the GPU.
        progress: Returns the cursor after the last processed step.
    """

    def __init__(
        self, stream: CorpusStream, num_workers: int, pin_memory: bool, progress: Callable[[], dict[str, Any]]
    ) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self._progress = progress

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last processed step."""
        return {"cursor": dict(self._progress()), "corpus": corpus_name(self.dataset.corpus)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checks that the stream starts where the checkpoint left it (the job built it from its restored cursor).

        Args:
            state_dict: What :meth:`state_dict` returned when the checkpoint was written.
        """
        saved = state_dict.get("cursor", {})
        start = self.dataset.start
        keys = ("steps", "documents", "tokens", "skip")
        if any(int(saved.get(k, 0)) != int(start[k]) for k in keys):
            raise RuntimeError(
                f"Cannot resume the statistics stream: the checkpoint's loader stopped at "
                f"{ {k: saved.get(k) for k in keys} } but the job's partial sums are at { {k: start[k] for k in keys} }"
            )
