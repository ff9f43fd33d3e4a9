"""Second-moment statistics of the keys of a linear layer: ``C = E[k k^T]``, computed once and cached on disk.

ROME (and MEMIT after it) treats an MLP out-projection ``W`` as a linear associative memory that maps keys ``k``
(the module's *inputs*) to values ``W k``. To write a new association ``k* -> v*`` while disturbing the others as
little as possible, the update is shaped by the second moment of the keys the layer sees in ordinary text::

    C = E[k k^T] = (1 / N) * sum_{t=1..N} k_t k_t^T        (in_dim x in_dim)

where ``k_t`` runs over the module's input at every token ``t`` of a text corpus (Wikipedia or WikiText in the
paper). :func:`second_moment` computes that matrix.

What ``n_samples`` counts. As in ROME, ``n_samples`` is a number of **documents**: the first ``n_samples`` non-empty
texts of the corpus, in order. Every token of each of them (after truncation to ``max_length`` tokens, special
tokens the tokenizer adds included, padding excluded) contributes one key, so ``N`` - stored in the cache as
``n_tokens`` - is usually much larger than ``n_samples``. A corpus with fewer documents is used in full.

Corpora.

- ``"wikitext:wikitext-103-raw-v1"``: a Hugging Face hub dataset ``id[:config[:split]]`` (split ``train`` by default),
  loaded with ``datasets.load_dataset``; the ``text`` column.
- ``path/to/file.txt``: one document per non-empty line.
- ``path/to/file.jsonl`` / ``.json``: records with a ``"text"`` field (JSON lines, or one JSON list).

Caching. The matrix is written as safetensors (never pickle) to
``<cache>/stats/<model>__<module>__<corpus>__<n_samples>__<dtype>.safetensors``; ``<cache>`` is
:func:`~prune_lightning.models.default_cache_dir` unless ``cache_dir`` is given. The same facts, plus the token
count, the truncation length and (for local files) the corpus's SHA-256, are stored in the file's metadata; a cache
file whose metadata does not match the request is recomputed. The file is written to a temporary sibling and renamed,
so an interrupted run never leaves a truncated cache behind.

Users with precomputed statistics pass ``stats_file`` (a safetensors file holding the tensor ``"mom2"`` or a single
tensor, or a ``.npy`` array); its shape is checked against the module's input dimension.

The accumulation itself lives in :func:`_accumulate_second_moment`, which returns the raw sum and the token count, so
that a distributed job can all-reduce both before dividing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from prune_lightning.models import default_cache_dir, get_module, is_transposed, resolve_dtype

__all__ = ["second_moment", "load_corpus_texts", "load_stats_file", "stats_cache_path"]

STATS_FORMAT = "prune_lightning.second_moment/1"
_STATS_KEY = "mom2"
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
_DEFAULT_MAX_LENGTH = 1024


class _StopForward(Exception):
    """Raised by a hook once the keys of a batch are captured: the layers above are not needed."""


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
        max_length: Documents are truncated to this many tokens (default: the model's context length, at most 1024).
        cache_dir: Where the cache lives (default: ``default_cache_dir() / "stats"``).
        stats_file: Precomputed statistics (safetensors with a ``"mom2"`` tensor or a single tensor, or ``.npy``);
            when given, nothing is computed or cached.
        model_id: Name of the model in the cache file name (default: basename of ``model.config._name_or_path``).
        recompute: Ignore an existing cache file and compute (and rewrite) it.

    Returns:
        The ``(in_dim, in_dim)`` matrix ``C`` as float32, on the CPU.
    """
    module = get_module(model, module_name)
    in_dim = _input_dim(module)
    if stats_file is not None:
        return load_stats_file(stats_file, in_dim=in_dim, module_name=module_name)
    if n_samples < 1:
        raise ValueError(f"n_samples must be a positive number of documents, got {n_samples}")
    acc_dtype = resolve_dtype(dtype)
    if acc_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64' for accumulating statistics, got {dtype!r}")
    dtype_name = str(acc_dtype).removeprefix("torch.")
    max_length = int(max_length) if max_length is not None else _default_max_length(model)
    model_id = model_id or _default_model_id(model)

    path = stats_cache_path(model_id, module_name, corpus, n_samples, dtype_name, cache_dir=cache_dir)
    local = _local_corpus_path(corpus)
    expected = {
        "format": STATS_FORMAT,
        "model_id": model_id,
        "module": module_name,
        # A local file is known by its name and content, so another spelling of its path reuses the cache.
        "corpus": local.name if local is not None else str(corpus),
        "n_samples": str(n_samples),
        "dtype": dtype_name,
        "max_length": str(max_length),
    }
    if local is not None:
        expected["corpus_sha256"] = _sha256(local)

    if path.exists() and not recompute:
        cached = _load_cache(path, expected, in_dim)
        if cached is not None:
            return cached

    texts = load_corpus_texts(corpus, n_samples)
    if not texts:
        raise ValueError(f"Corpus {corpus!r} holds no non-empty text to compute statistics from")
    if len(texts) < n_samples:
        rank_zero_warn(f"Corpus {corpus!r} holds only {len(texts)} documents (< n_samples={n_samples}); using all.")
    rank_zero_info(
        f"Computing the second moment of the inputs of {module_name} over {len(texts)} documents of {corpus} "
        f"(cache: {path})"
    )
    total, n_tokens = _accumulate_second_moment(
        model, tokenizer, module, texts, batch_size=batch_size, max_length=max_length, dtype=acc_dtype
    )
    if n_tokens == 0:
        raise ValueError(f"Corpus {corpus!r} gave no tokens to compute statistics from")
    moment = (total / n_tokens).cpu().contiguous()
    metadata = dict(expected, n_tokens=str(n_tokens), n_documents=str(len(texts)))
    _save_atomic(path, moment, metadata)
    return moment.float()


def stats_cache_path(
    model_id: str,
    module_name: str,
    corpus: str,
    n_samples: int,
    dtype: str,
    cache_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Where :func:`second_moment` caches a matrix: ``<dir>/<model>__<module>__<corpus>__<n>__<dtype>.safetensors``.

    Args:
        model_id: Name of the model (e.g. ``"gpt2-xl"``).
        module_name: The measured module.
        corpus: The corpus spec; a local file contributes its file name only.
        n_samples: Number of documents.
        dtype: Accumulation dtype name.
        cache_dir: The directory (default: ``default_cache_dir() / "stats"``).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    local = _local_corpus_path(corpus)
    corpus_name = local.name if local is not None else str(corpus)
    parts = [model_id, module_name, corpus_name, str(n_samples), dtype]
    return root / ("__".join(_slug(p) for p in parts) + ".safetensors")


def load_corpus_texts(corpus: str, n_samples: Optional[int] = None) -> list[str]:
    """The first ``n_samples`` non-empty documents of a corpus (all of them when ``n_samples`` is None).

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` or a local ``.txt`` / ``.jsonl`` / ``.json`` file.
        n_samples: How many documents to return at most.
    """
    local = _local_corpus_path(corpus)
    texts = _local_texts(local) if local is not None else _hub_texts(str(corpus))
    out: list[str] = []
    for text in texts:
        if n_samples is not None and len(out) >= n_samples:
            break
        if text and text.strip():
            out.append(text)
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


# --------------------------------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------------------------------


def _accumulate_second_moment(
    model: nn.Module,
    tokenizer,
    module: nn.Module,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = _DEFAULT_MAX_LENGTH,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, int]:
    """Sums ``k k^T`` over the inputs ``k`` of ``module`` at every non-padding token of ``texts``.

    The forward pass stops at ``module`` (nothing above it is computed). Documents are right-padded per batch and the
    padding positions are masked out, so the result does not depend on ``batch_size``.

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer.
        module: The module whose inputs are the keys (a submodule of ``model``).
        texts: The documents.
        batch_size: Documents per forward pass.
        max_length: Truncation length in tokens.
        dtype: Accumulation dtype.

    Returns:
        ``(sum over tokens of k k^T, number of tokens)``; the sum lives on the model's device.
    """
    device = _model_device(model)
    in_dim = _input_dim(module)
    total = torch.zeros(in_dim, in_dim, dtype=dtype, device=device)
    n_tokens = 0
    captured: dict[str, torch.Tensor] = {}

    def capture(_module, args):
        captured["keys"] = args[0]
        raise _StopForward

    pad_id = _pad_id(tokenizer)
    handle = module.register_forward_pre_hook(capture)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                encoded = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length)
                seqs = [ids for ids in encoded["input_ids"] if len(ids) > 0]
                if not seqs:
                    continue
                input_ids, attention_mask = pad_right(seqs, pad_id, device)
                captured.clear()
                try:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _StopForward:
                    pass
                if "keys" not in captured:
                    raise RuntimeError("The forward pass never reached the measured module; is it part of the model?")
                keys = captured["keys"][attention_mask.bool()].to(dtype)
                total.addmm_(keys.T, keys)
                n_tokens += keys.shape[0]
    finally:
        handle.remove()
        for m, flag in was_training.items():
            m.training = flag
    return total, n_tokens


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads token id lists into ``(input_ids, attention_mask)`` (right padding keeps positions 0, 1, ...)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _input_dim(module: nn.Module) -> int:
    weight = module.weight
    return int(weight.shape[0] if is_transposed(module) else weight.shape[1])


def _default_max_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(int(context), _DEFAULT_MAX_LENGTH) if context else _DEFAULT_MAX_LENGTH


def _default_model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    return Path(str(name).rstrip("/")).name or type(model).__name__


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
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # offline, unknown id, ...: say what to do instead
        raise RuntimeError(
            f"Could not load the statistics corpus {corpus!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Give a local .txt/.jsonl file as the corpus, or precomputed statistics as stats_file."
        ) from err
    if "text" not in dataset.column_names:
        raise ValueError(f"Corpus {corpus!r} has no 'text' column; columns: {dataset.column_names}")
    for batch in dataset.iter(batch_size=1000):
        yield from batch["text"]


def _load_cache(path: Path, expected: dict[str, str], in_dim: int) -> Optional[torch.Tensor]:
    """The cached matrix if its metadata matches ``expected`` and its shape is right, else None (with a warning)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            moment = f.get_tensor(_STATS_KEY)
    except Exception as err:  # unreadable / foreign file: recompute
        rank_zero_warn(f"Ignoring unreadable statistics cache {path} ({err}); recomputing it.")
        return None
    stale = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
    if stale or tuple(moment.shape) != (in_dim, in_dim):
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
