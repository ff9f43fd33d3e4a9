"""What a cached ``C`` is a function of, and when a cached ``C`` answers a request.

A second moment ``C = E[k k^T]`` is fixed by the model's weights, the tokenizer, the documents, how they are cut and
how the forward pass and the sums are computed. A cache file records all of it in its metadata (strings):

- the model: ``model_id``, ``module``, ``model_revision`` (the hub commit, when the model came from the hub),
  ``model_dtype`` (its parameters' dtype; recorded, not compared);
- the tokenizer: ``tokenizer_sha256`` (:func:`tokenizer_sha256`);
- the documents: ``corpus`` (the spec), for a hub corpus ``dataset_id``, ``dataset_config``, ``dataset_split``,
  ``dataset_revision`` (where the spec pins one) and ``dataset_fingerprint`` (where ``datasets`` gives one: a streamed
  dataset has none), for a local file ``corpus_sha256``; ``n_samples`` (documents asked for), ``max_tokens`` (a token
  budget), ``max_length`` (truncation); what was read: ``n_documents``, ``n_tokens`` and ``sample_sha256`` (a running
  digest of the documents read, in order: :func:`~.corpus.chain_digest`);
- the arithmetic: ``dtype`` (of the sums) and ``forward_precision`` (``model``: the model's own dtype; ``bfloat16``:
  autocast; ``tf32``: TF32 matmuls; :mod:`.precision`);
- where it came from: ``source`` (``computed``, or ``imported`` from the authors' layout with ``imported_file``,
  ``imported_sha256`` and the reference's own facts, :mod:`.reference`), and ``unknown``: the fields the file could not
  know (comma-separated).

The rule (:func:`provenance_differences`). A request names the fields it knows (:func:`.cache.expected_metadata`);
each of them that the file records must be equal. A field the file does not record (an older file, or one listed in
its ``unknown``: an imported file does not know the tokenizer or the model revision the authors used) is not
compared; a field the request does not name is not compared (``forward_precision`` is compared only when the request
names one: an editor takes a ``C`` that ``prune-edit stats --forward_precision bfloat16`` prepared for it). A file at
the path of a request that differs in a compared field is refused (:class:`StatsProvenanceError`, naming the fields),
never silently recomputed or used: recompute it (``recompute=True``, ``prune-edit stats ... --recompute``) or delete
it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Optional, Union

__all__ = ["StatsProvenanceError", "provenance_differences", "tokenizer_sha256", "unknown_fields"]

# Whitespace runs, tabs, newlines, digits, punctuation and non-ASCII text: what normalizers, pre-tokenizers and
# post-processors (an added BOS) treat differently.
_PROBE = "Hello, world! The  quick\tbrown fox\njumps 1234 times: café, naïve, Ünïcödé ☃ 日本語 - ok?\n\n  end "


def tokenizer_sha256(tokenizer) -> str:
    """A SHA-256 of what makes a tokenizer's token ids: its vocabulary, its merges (BPE) and the ids it gives a fixed
    probe text (which covers normalization, pre-tokenization and added special tokens such as a BOS).

    It does not depend on the tokenizer's class or on how its files are serialized (a fast and a slow tokenizer with
    the same vocabulary, merges and behaviour hash alike), nor on its padding or truncation settings.

    Args:
        tokenizer: A Hugging Face tokenizer.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    # verbose=False: the probe may be longer than a tiny model's context; it is hashed, never run through a model
    probe = list(tokenizer(_PROBE, verbose=False)["input_ids"])
    payload = {"vocab": vocab, "merges": _merges(tokenizer), "probe": probe}
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _merges(tokenizer) -> list[str]:
    """The BPE merges as ``"a b"`` strings, in rank order (empty for other models)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ranks = getattr(tokenizer, "bpe_ranks", None)  # a slow BPE tokenizer
    return [" ".join(pair) for pair, _ in sorted(ranks.items(), key=lambda item: item[1])] if ranks else []


def unknown_fields(metadata: Mapping[str, str]) -> set[str]:
    """The fields a file says it could not know (its ``unknown`` entry, comma-separated)."""
    return {field for field in metadata.get("unknown", "").split(",") if field}


def provenance_differences(metadata: Mapping[str, str], expected: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{field: (in the file, requested)}`` for every requested field the file records with another value.

    Fields the file does not record, or lists as unknown, are not compared (see the module docstring).

    Args:
        metadata: The file's metadata.
        expected: The request's (:func:`.cache.expected_metadata`).
    """
    unknown = unknown_fields(metadata)
    return {
        field: (metadata[field], value)
        for field, value in expected.items()
        if field in metadata and field not in unknown and metadata[field] != value
    }


class StatsProvenanceError(ValueError):
    """A cached ``C`` at the path of a request was computed under other settings; names the fields that differ.

    Args:
        path: The cache file.
        differences: ``{field: (in the file, requested)}``.
    """

    def __init__(self, path: Union[str, Path], differences: Mapping[str, tuple[str, str]]) -> None:
        self.path = str(path)
        self.differences = dict(differences)
        details = "; ".join(f"{field}: {_short(old)} in the file, {_short(new)} requested"
                            for field, (old, new) in self.differences.items())
        super().__init__(
            f"The statistics cache {self.path} does not match this request ({details}). A C computed under other "
            "settings is a different C, so it is not used: recompute it (recompute=True, or prune-edit stats ... "
            "--recompute) or delete the file."
        )

    def __reduce__(self):  # keep the attributes across pickling (ddp_spawn)
        return (type(self), (self.path, self.differences))


def _short(value: Optional[str]) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:19] + "..." + text[-18:]
