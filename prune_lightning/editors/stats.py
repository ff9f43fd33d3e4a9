"""Second-moment statistics of the keys of a linear layer: ``C = E[k k^T]``, computed once and cached on disk.

ROME (and MEMIT after it) treats an MLP out-projection ``W`` as a linear associative memory that maps keys ``k``
(the module's *inputs*) to values ``W k``. To write a new association ``k* -> v*`` while disturbing the others as
little as possible, the update is shaped by the second moment of the keys the layer sees in ordinary text::

    C = E[k k^T] = (1 / N) * sum_{t=1..N} k_t k_t^T        (in_dim x in_dim)

where ``k_t`` runs over the module's input at every token ``t`` of a text corpus (Wikipedia or WikiText in the
paper). :func:`second_moment` returns that matrix for one module, :func:`second_moments` for several (MEMIT's
layers) from one pass over the corpus.

What ``n_samples`` counts. As in ROME, ``n_samples`` is a number of **documents**: the first ``n_samples`` non-empty
texts of the corpus, in order. Every token of each of them (after truncation to ``max_length`` tokens, special
tokens the tokenizer adds included, padding excluded) contributes one key, so ``N`` - stored in the cache as
``n_tokens`` - is usually much larger than ``n_samples``. A corpus with fewer documents is used in full. An optional
token budget ``max_tokens`` ends the stream earlier: documents are taken in order until ``max_tokens`` tokens are
counted, the last one cut to fit, so that ``N = max_tokens`` exactly.

Corpora (read as a stream, never loaded whole).

- ``"wikimedia/wikipedia:20231101.en"`` (:data:`REFERENCE_CORPUS`, what the editors' presets use) or
  ``"wikitext:wikitext-103-raw-v1"``: a Hugging Face hub dataset ``id[:config[:split]]`` (split ``train`` by default),
  streamed with ``datasets.load_dataset(..., streaming=True)``; the ``text`` column.

The authors' statistics (``kmeng01/rome`` ``rome/layer_stats.py``) are over a seeded pseudorandom sample of 100,000
Wikipedia articles (dump ``20200501.en``, no longer loadable), cut to the model's context; here they are the first
``n_samples`` articles of the stream. The two samples differ, so ``C`` differs by sampling noise.
- ``path/to/file.txt``: one document per non-empty line.
- ``path/to/file.jsonl`` / ``.json``: records with a ``"text"`` field (JSON lines, or one JSON list).

Caching. The matrix is written as safetensors (never pickle) to
``<cache>/stats/<model>__<module>__<corpus>__<n_samples>__<dtype>.safetensors`` (with a token budget the count
reads ``<n_samples>-<max_tokens>tok``); ``<cache>`` is :func:`~prune_lightning.models.default_cache_dir` unless
``cache_dir`` is given. The same facts, plus the token count, the truncation length and (for local files) the
corpus's SHA-256, are stored in the file's metadata; a cache file whose metadata does not match the request is
recomputed. The file is written to a temporary sibling and renamed, so an interrupted run never leaves a truncated
cache behind.

Computing. Missing statistics are computed by the statistics job, :class:`~.stats_job.SecondMomentJob`, run by a
``Trainer`` of its own on the model's device: streamed, resumable from its partial sums, sharded and all-reduced
across processes (see :mod:`.stats_job`). The same job is the command ``prune-edit stats``, which fills the cache
ahead of an editing run.

Users with precomputed statistics pass ``stats_file`` (a safetensors file holding the tensor ``"mom2"`` or a single
tensor, or a ``.npy`` array); its shape is checked against the module's input dimension.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from prune_lightning.models import context_length, default_cache_dir, get_module, input_dim, resolve_dtype

__all__ = [
    "REFERENCE_CORPUS",
    "second_moment",
    "second_moments",
    "iter_corpus_documents",
    "load_corpus_texts",
    "load_stats_file",
    "stats_cache_path",
]

STATS_FORMAT = "prune_lightning.second_moment/1"
#: The corpus of the authors' statistics: English Wikipedia (``kmeng01/rome`` ``rome/layer_stats.py`` loads the
#: ``wikipedia`` dataset, dump ``20200501.en``, which today's ``datasets`` can no longer load; this is its successor).
REFERENCE_CORPUS = "wikimedia/wikipedia:20231101.en"
_STATS_KEY = "mom2"
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
# Documents are cut to the model's context, at most this many tokens (EasyEdit's layer_stats.py; ROME's GPT-2 has 1024).
_DEFAULT_MAX_LENGTH = 4096


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------


def second_moment(
    model: nn.Module,
    tokenizer,
    module_name: str,
    corpus: str,
    n_samples: int = 100000,
    dtype: str = "float32",
    batch_size: int = 16,
    max_length: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    stats_file: Optional[Union[str, Path]] = None,
    model_id: Optional[str] = None,
    recompute: bool = False,
    max_tokens: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every_n_steps: Optional[int] = None,
) -> torch.Tensor:
    """The second moment ``C = E[k k^T]`` of the inputs ``k`` of ``module_name`` over a text corpus.

    Args:
        model: The causal LM whose module is measured (its weights as they are now).
        tokenizer: The model's tokenizer.
        module_name: The linear module whose inputs are the keys, e.g. ``"transformer.h.17.mlp.c_proj"``.
        corpus: Hub dataset ``"id[:config[:split]]"`` (column ``text``) or a local ``.txt`` / ``.jsonl`` / ``.json``
            file.
        n_samples: Number of documents (the first non-empty texts of the corpus); all their tokens count.
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``; the cache file stores the moment in this dtype.
        batch_size: Documents per forward pass.
        max_length: Documents are truncated to this many tokens (default: the model's context length, at most 4096).
        cache_dir: Where the cache lives (default: ``default_cache_dir() / "stats"``).
        stats_file: Precomputed statistics (safetensors with a ``"mom2"`` tensor or a single tensor, or ``.npy``);
            when given, nothing is computed or cached.
        model_id: Name of the model in the cache file name (default: basename of ``model.config._name_or_path``).
        recompute: Ignore an existing cache file and compute (and rewrite) it.
        max_tokens: Token budget: stop once this many tokens are counted (default: no budget).
        checkpoint_dir: Where the job keeps its partial sums while it runs (default: a folder under the cache that
            is removed once the cache file is written); an interrupted computation resumes from there.
        checkpoint_every_n_steps: Save the partial sums every this many batches (default: every 10 minutes).

    Returns:
        The ``(in_dim, in_dim)`` matrix ``C`` as float32, on the CPU.
    """
    module = get_module(model, module_name)
    in_dim = input_dim(module)
    if stats_file is not None:
        return load_stats_file(stats_file, in_dim=in_dim, module_name=module_name)
    return second_moments(
        model,
        tokenizer,
        [module_name],
        corpus,
        n_samples=n_samples,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        cache_dir=cache_dir,
        model_id=model_id,
        recompute=recompute,
        max_tokens=max_tokens,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=checkpoint_every_n_steps,
    )[module_name]


def second_moments(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    corpus: str,
    n_samples: int = 100000,
    dtype: str = "float32",
    batch_size: int = 16,
    max_length: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    model_id: Optional[str] = None,
    recompute: bool = False,
    max_tokens: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every_n_steps: Optional[int] = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """:func:`second_moment` of several modules; the ones not cached yet come from **one** pass over the corpus.

    Cached matrices are read; the missing ones are computed together by the statistics job (one forward pass per
    batch feeds all of them, stopped at the last measured module) and written to the cache, one file per module.
    Inside a ``torch.distributed`` program (e.g. called from a DDP rank's ``setup``) every process takes a share of
    the documents and the sums are all-reduced; all processes return the same matrices and process 0 writes them
    (see :mod:`.stats_job`).

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer.
        module_names: The linear modules whose inputs are measured.
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        n_samples: Number of documents.
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``.
        batch_size: Documents per forward pass.
        max_length: Truncation length in tokens (default: the model's context length, at most 4096).
        cache_dir: Where the cache lives (default: ``default_cache_dir() / "stats"``).
        model_id: Name of the model in the cache file names (default: basename of ``model.config._name_or_path``).
        recompute: Ignore existing cache files.
        max_tokens: Token budget (default: none).
        checkpoint_dir: Where the job keeps its partial sums (default: under the cache, removed after success).
        checkpoint_every_n_steps: Save the partial sums every this many batches (default: every 10 minutes).
        num_workers: DataLoader processes that read and tokenize ahead of the forward passes.

    Returns:
        ``{module name: (in_dim, in_dim) float32 CPU matrix}``, in the order of ``module_names``.
    """
    names = list(module_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"module_names must name at least one module, each once; got {names}")
    in_dims = {name: input_dim(get_module(model, name)) for name in names}
    _check_request(n_samples, max_tokens)
    dtype_name = accumulation_dtype(dtype)[1]
    max_length = int(max_length) if max_length is not None else _default_max_length(model)
    model_id = model_id or _default_model_id(model)
    local = _local_corpus_path(corpus)
    corpus_sha256 = _sha256(local) if local is not None else None

    results: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name in names:
        path = stats_cache_path(
            model_id, name, corpus, n_samples, dtype_name, cache_dir=cache_dir, max_tokens=max_tokens
        )
        expected = expected_metadata(
            model_id, name, corpus, n_samples, dtype_name, max_length, max_tokens=max_tokens,
            corpus_sha256=corpus_sha256,
        )
        cached = _load_cache(path, expected, in_dims[name]) if path.exists() and not recompute else None
        if cached is None:
            missing.append(name)
        else:
            results[name] = cached

    from prune_lightning.editors import stats_job

    missing = stats_job.agree_on_missing(names, missing)  # all processes compute together, or none does
    if missing:
        rank_zero_info(
            f"Computing the second moment of the inputs of {', '.join(missing)} over up to {n_samples} documents of "
            f"{corpus} (cache: {Path(cache_dir) if cache_dir is not None else default_cache_dir() / 'stats'})"
        )
        results.update(
            stats_job.compute_second_moments(
                model,
                tokenizer,
                missing,
                corpus,
                n_samples=n_samples,
                dtype=dtype_name,
                batch_size=batch_size,
                max_length=max_length,
                max_tokens=max_tokens,
                cache_dir=cache_dir,
                model_id=model_id,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every_n_steps=checkpoint_every_n_steps,
                num_workers=num_workers,
            )
        )
    return {name: results[name] for name in names}


def stats_cache_path(
    model_id: str,
    module_name: str,
    corpus: str,
    n_samples: int,
    dtype: str,
    cache_dir: Optional[Union[str, Path]] = None,
    max_tokens: Optional[int] = None,
) -> Path:
    """Where :func:`second_moment` caches a matrix: ``<dir>/<model>__<module>__<corpus>__<n>__<dtype>.safetensors``.

    Args:
        model_id: Name of the model (e.g. ``"gpt2-xl"``).
        module_name: The measured module.
        corpus: The corpus spec; a local file contributes its file name only.
        n_samples: Number of documents.
        dtype: Accumulation dtype name.
        cache_dir: The directory (default: ``default_cache_dir() / "stats"``).
        max_tokens: The token budget, if any: the count then reads ``<n>-<max_tokens>tok``.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    count = str(n_samples) if max_tokens is None else f"{n_samples}-{int(max_tokens)}tok"
    parts = [model_id, module_name, corpus_name(corpus), count, dtype]
    return root / ("__".join(_slug(p) for p in parts) + ".safetensors")


def expected_metadata(
    model_id: str,
    module_name: str,
    corpus: str,
    n_samples: int,
    dtype: str,
    max_length: int,
    max_tokens: Optional[int] = None,
    corpus_sha256: Optional[str] = None,
) -> dict[str, str]:
    """The metadata a cache file of this request carries (before ``n_tokens`` / ``n_documents`` are known).

    Args:
        model_id: Name of the model.
        module_name: The measured module.
        corpus: The corpus spec; a local file is known by its name and ``corpus_sha256``.
        n_samples: Number of documents.
        dtype: Accumulation dtype name.
        max_length: Truncation length in tokens.
        max_tokens: The token budget, if any (only then is it part of the metadata).
        corpus_sha256: SHA-256 of a local corpus file (computed here when not given).
    """
    local = _local_corpus_path(corpus)
    expected = {
        "format": STATS_FORMAT,
        "model_id": model_id,
        "module": module_name,
        # A local file is known by its name and content, so another spelling of its path reuses the cache.
        "corpus": corpus_name(corpus),
        "n_samples": str(n_samples),
        "dtype": dtype,
        "max_length": str(max_length),
    }
    if max_tokens is not None:
        expected["max_tokens"] = str(int(max_tokens))
    if local is not None:
        expected["corpus_sha256"] = corpus_sha256 or _sha256(local)
    return expected


def iter_corpus_documents(corpus: str) -> Iterator[str]:
    """The non-empty documents of a corpus, in order, read as a stream.

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` (streamed) or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
    """
    local = _local_corpus_path(corpus)
    texts = _local_texts(local) if local is not None else _hub_texts(str(corpus))
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


def load_stats_file(
    path: Union[str, Path], in_dim: Optional[int] = None, module_name: str = "the module"
) -> torch.Tensor:
    """Reads user-provided second-moment statistics (safetensors or ``.npy``) and checks their shape.

    Args:
        path: A ``.safetensors`` file holding the tensor ``"mom2"`` (or exactly one tensor), or a ``.npy`` array.
        in_dim: The input dimension of the module; the matrix must be ``(in_dim, in_dim)``.
        module_name: Named in the error message.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stats_file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if _STATS_KEY in tensors:
            moment = tensors[_STATS_KEY]
        elif len(tensors) == 1:
            moment = next(iter(tensors.values()))
        else:
            raise ValueError(
                f"stats_file {str(path)!r} holds tensors {sorted(tensors)}; expected one named {_STATS_KEY!r} "
                "or exactly one tensor"
            )
    elif suffix == ".npy":
        import numpy as np

        moment = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        raise ValueError(f"stats_file {str(path)!r}: unsupported format {suffix!r}; use .safetensors or .npy")
    if in_dim is not None and tuple(moment.shape) != (in_dim, in_dim):
        raise ValueError(
            f"stats_file {str(path)!r} holds a matrix of shape {tuple(moment.shape)}, but {module_name} takes inputs "
            f"of dimension {in_dim}: expected shape ({in_dim}, {in_dim})"
        )
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"stats_file {str(path)!r} holds shape {tuple(moment.shape)}; expected a square matrix")
    return moment.float().contiguous()


def accumulation_dtype(dtype: Union[str, torch.dtype]) -> tuple[torch.dtype, str]:
    """``(torch dtype, name)`` of an accumulation dtype; only float32 and float64 are accepted.

    Args:
        dtype: ``"float32"`` / ``"float64"`` (or an alias :func:`~prune_lightning.models.resolve_dtype` knows).
    """
    resolved = resolve_dtype(dtype)
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64' for accumulating statistics, got {dtype!r}")
    return resolved, str(resolved).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _default_max_length(model: nn.Module) -> int:
    context = context_length(model)
    return min(context, _DEFAULT_MAX_LENGTH) if context else _DEFAULT_MAX_LENGTH


def _default_model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    return Path(str(name).rstrip("/")).name or type(model).__name__


def _check_request(n_samples: int, max_tokens: Optional[int]) -> None:
    def positive_int(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1

    if not positive_int(n_samples):
        raise ValueError(f"n_samples must be a positive number of documents, got {n_samples!r}")
    if max_tokens is not None and not positive_int(max_tokens):
        raise ValueError(f"max_tokens must be None or a positive number of tokens, got {max_tokens!r}")


def corpus_name(corpus: Union[str, Path]) -> str:
    """How a corpus is named in cache file names and metadata: a local file by its file name, a hub id as given."""
    local = _local_corpus_path(corpus)
    return local.name if local is not None else str(corpus)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "none"


def _local_corpus_path(corpus: Union[str, Path]) -> Optional[Path]:
    """The corpus as a local file, or None for a hub dataset; a missing file with a known suffix is an error."""
    path = Path(corpus)
    if path.is_file():
        return path
    if path.suffix.lower() in _LOCAL_SUFFIXES:
        raise FileNotFoundError(f"Corpus file {str(corpus)!r} does not exist")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_texts(path: Path) -> Iterable[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for line in f:
                if not line.strip():
                    continue
                yield _text_field(json.loads(line), path, index)
                index += 1
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records with a 'text' field")
        for index, record in enumerate(records):
            yield _text_field(record, path, index)
    else:  # plain text: one document per line
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.strip()


def _text_field(record, path: Path, index: int) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}: record {index}: field 'text': missing or not a string")
    return record["text"]


def _hub_texts(corpus: str) -> Iterable[str]:
    import datasets

    name, _, rest = corpus.partition(":")
    config, _, split = rest.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as err:  # offline, unknown id, ...: say what to do instead
        raise RuntimeError(
            f"Could not load the statistics corpus {corpus!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Give a local .txt/.jsonl file as the corpus, or precomputed statistics as stats_file."
        ) from err
    for index, row in enumerate(dataset):
        if "text" not in row:
            raise ValueError(f"Corpus {corpus!r}: record {index} has no 'text' column; columns: {sorted(row)}")
        yield row["text"]


def _load_cache(path: Path, expected: dict[str, str], in_dim: Optional[int]) -> Optional[torch.Tensor]:
    """The cached matrix if its metadata matches ``expected`` and its shape is right, else None (with a warning).

    ``in_dim=None`` checks only that the matrix is square.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            moment = f.get_tensor(_STATS_KEY)
    except Exception as err:  # unreadable / foreign file: recompute
        rank_zero_warn(f"Ignoring unreadable statistics cache {path} ({err}); recomputing it.")
        return None
    stale = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
    side = in_dim if in_dim is not None else (moment.shape[0] if moment.ndim == 2 else -1)
    if stale or tuple(moment.shape) != (side, side):
        rank_zero_warn(f"Statistics cache {path} does not match this request {stale or moment.shape}; recomputing it.")
        return None
    return moment.float()


def _save_atomic(path: Path, moment: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({_STATS_KEY: moment}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
