"""Where second-moment statistics live on disk: the cache's file names, their provenance metadata, loading, saving.

A matrix is written as safetensors (never pickle) to
``<cache>/stats/<model>__<module>__<corpus>__<n_samples>__<dtype>.safetensors`` (with a token budget the count
reads ``<n_samples>-<max_tokens>tok``); ``<cache>`` is :func:`~prune_lightning.models.default_cache_dir` unless
``cache_dir`` is given. Files are written through :func:`prune_lightning.io.atomic_target`, so an interrupted run never
leaves a truncated cache behind.

Provenance. The file's metadata records what its ``C`` is a function of (:mod:`.provenance` lists the fields): the
model (id, module, hub revision), the tokenizer (``tokenizer_sha256``), the corpus (spec; dataset id, config, split,
revision and fingerprint of a hub dataset, or the SHA-256 of a local file; ``n_samples``, ``max_tokens``,
``max_length``; the documents and tokens read and a digest of the documents), the arithmetic (``dtype``,
``forward_precision``) and its ``source`` (``computed`` by the job, or ``imported`` from the authors' layout,
:mod:`.exchange`).

The rule (:func:`load_cached`). A request's metadata (:func:`expected_metadata`) names what it knows. A cache file at
the request's path is used when every field it shares with the request is equal (fields the file does not record or
lists as ``unknown`` are not compared; ``forward_precision`` only when the request names one) and its matrix has the
module's shape. Otherwise it is **refused**: :class:`~.provenance.StatsProvenanceError` (a ``ValueError``) names each
field that differs, with both values; recompute (``recompute=True``, ``prune-edit stats ... --recompute``) or delete the
file. A cached ``C`` of another model revision, tokenizer or corpus content is never used, and never silently
replaced. An unreadable file (not safetensors, no ``mom2`` tensor) is recomputed with a warning.

Users with precomputed statistics pass ``stats_file`` (:func:`load_stats_file`: a safetensors file holding the tensor
``"mom2"`` or a single tensor, a ``.npy`` array, or an ``.npz`` in the authors' layout); its shape is checked against
the module's input dimension. ``prune-edit stats import`` files such ``.npz`` files into the cache instead.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import re

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from prune_lightning.io import atomic_target
from prune_lightning.models import context_length, default_cache_dir, resolve_dtype, resolve_model_path
from prune_lightning.stats.corpus import (REFERENCE_CORPUS, corpus_name, file_sha256, local_corpus_path,
                                          parse_corpus_spec)
from prune_lightning.stats.precision import check_forward_precision
from prune_lightning.stats.provenance import StatsProvenanceError, provenance_differences
from prune_lightning.stats.reference import read_reference_file

__all__ = [
    "STATS_FORMAT",
    "StatsSettings",
    "check_conditioning",
    "check_max_length",
    "read_metadata",
    "accumulation_dtype",
    "check_request",
    "default_max_length",
    "default_model_id",
    "expected_metadata",
    "load_cached",
    "load_stats_file",
    "model_id_from_name",
    "model_revision",
    "save_moment",
    "slug",
    "stats_cache_path",
]


@dataclass(frozen=True)
class StatsSettings:
    """What statistics to compute and how: the settings that travel from :func:`second_moments` to the job.

    Args:
        corpus: Hub dataset ``"id[:config[:split]]"`` (column ``text``) or a local ``.txt`` / ``.jsonl`` / ``.json``
            file.
        n_samples: Number of documents (the first non-empty texts of the corpus); all their tokens count.
        dtype: Accumulation dtype, ``"float32"`` or ``"float64"``; the cache file stores the moment in this dtype.
        batch_size: Documents per forward pass.
        max_length: Documents are truncated to this many tokens (default: the model's context length, at most 4096).
        max_tokens: Token budget: stop once this many tokens are counted (default: no budget).
        cache_dir: Where the cache lives (default: ``default_cache_dir() / "stats"``).
        model_id: Name of the model in the cache file names (default: basename of ``model.config._name_or_path``).
        checkpoint_dir: Where the job keeps its partial sums while it runs (default: a folder under the cache that
            is removed once the cache files are written); an interrupted computation resumes from there.
        checkpoint_every_n_steps: Save the partial sums every this many batches (default: every 10 minutes).
        num_workers: DataLoader processes that read and tokenize ahead of the forward passes.
    """

    corpus: str = REFERENCE_CORPUS
    n_samples: int = 100000
    dtype: str = "float32"
    batch_size: int = 16
    max_length: Optional[int] = None
    max_tokens: Optional[int] = None
    cache_dir: Optional[Union[str, Path]] = None
    model_id: Optional[str] = None
    checkpoint_dir: Optional[Union[str, Path]] = None
    checkpoint_every_n_steps: Optional[int] = None
    num_workers: int = 0
    forward_precision: Optional[str] = None

    def __post_init__(self) -> None:
        check_request(self.n_samples, self.max_tokens)
        accumulation_dtype(self.dtype)
        check_forward_precision(self.forward_precision)

STATS_FORMAT = "prune_lightning.second_moment/1"

_STATS_KEY = "mom2"

_DEFAULT_MAX_LENGTH = 4096


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
    return root / ("__".join(slug(p) for p in parts) + ".safetensors")


def expected_metadata(
    model_id: str,
    module_name: str,
    corpus: str,
    n_samples: int,
    dtype: str,
    max_length: Optional[int],
    max_tokens: Optional[int] = None,
    corpus_sha256: Optional[str] = None,
    model_revision: Optional[str] = None,
    tokenizer_sha256: Optional[str] = None,
    forward_precision: Optional[str] = None,
) -> dict[str, str]:
    """The metadata of a request, which a cache file of it carries (before what was read - ``n_tokens``,
    ``n_documents``, ``sample_sha256`` - is known). Optional facts are included only when given.

    Args:
        model_id: Name of the model.
        module_name: The measured module.
        corpus: The corpus spec; a local file is known by its name and ``corpus_sha256``, a hub dataset also by the
            parts of its spec (``dataset_id``, ``dataset_config``, ``dataset_split``, ``dataset_revision``).
        n_samples: Number of documents.
        dtype: Accumulation dtype name.
        max_length: Truncation length in tokens (None: not known, left out).
        max_tokens: The token budget, if any (only then is it part of the metadata).
        corpus_sha256: SHA-256 of a local corpus file (computed here when not given).
        model_revision: The commit of a hub model (:func:`model_revision`); recorded and matched when known.
        tokenizer_sha256: :func:`~.provenance.tokenizer_sha256` of the tokenizer; recorded and matched when known.
        forward_precision: The forward pass's precision (:mod:`.precision`); matched when given.
    """
    local = local_corpus_path(corpus)
    expected = {
        "format": STATS_FORMAT,
        "model_id": model_id,
        "module": module_name,
        # A local file is known by its name and content, so another spelling of its path reuses the cache.
        "corpus": corpus_name(corpus),
        "n_samples": str(n_samples),
        "dtype": dtype,
    }
    if max_length is not None:
        expected["max_length"] = str(max_length)
    if max_tokens is not None:
        expected["max_tokens"] = str(int(max_tokens))
    if local is not None:
        expected["corpus_sha256"] = corpus_sha256 or file_sha256(local)
    else:
        expected.update(parse_corpus_spec(corpus))
    if model_revision:
        expected["model_revision"] = model_revision
    if tokenizer_sha256:
        expected["tokenizer_sha256"] = tokenizer_sha256
    if check_forward_precision(forward_precision) is not None:
        expected["forward_precision"] = forward_precision
    return expected


def model_revision(model_or_config: Any) -> Optional[str]:
    """The hub commit a model (or its config) was loaded from, if it came from the hub (``config._commit_hash``)."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "_commit_hash", None)
    return str(value) if value else None


def model_id_from_name(name_or_path: str) -> str:
    """The model's name in the cache for a model given by name (what :func:`default_model_id` gives once it is
    loaded): the basename of the hub id or path (``openai-community/gpt2-xl`` -> ``gpt2-xl``)."""
    return Path(str(resolve_model_path(name_or_path)).rstrip("/")).name


def load_stats_file(
    path: Union[str, Path], in_dim: Optional[int] = None, module_name: str = "the module"
) -> torch.Tensor:
    """Reads user-provided second-moment statistics (safetensors, ``.npy`` or the authors' ``.npz``) and checks their
    shape.

    Args:
        path: A ``.safetensors`` file holding the tensor ``"mom2"`` (or exactly one tensor), a ``.npy`` array, or an
            ``.npz`` in the layout of ROME's ``layer_stats`` (:mod:`.reference`: ``C = mom2.mom2 / mom2.count``).
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
    elif suffix == ".npz":
        moment = read_reference_file(path, in_dim=in_dim, module_name=module_name).moment()
    else:
        raise ValueError(f"stats_file {str(path)!r}: unsupported format {suffix!r}; use .safetensors, .npy or the "
                         "reference's .npz")
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


def default_max_length(model: nn.Module) -> int:
    """The truncation length of documents: the model's context, at most 4096 tokens."""
    context = context_length(model)
    return min(context, _DEFAULT_MAX_LENGTH) if context else _DEFAULT_MAX_LENGTH


def check_max_length(model: nn.Module, max_length: Optional[int]) -> int:
    """``max_length`` (default: :func:`default_max_length`); one longer than the model's context is a ``ValueError``
    (the position embedding would fail mid-run)."""
    if max_length is None:
        return default_max_length(model)
    context = context_length(model)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
    if context and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context of {context} tokens; give at most "
                         f"{context} (or leave it out: documents are then cut to the context)")
    return max_length


def default_model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    return Path(str(name).rstrip("/")).name or type(model).__name__


def check_request(n_samples: int, max_tokens: Optional[int]) -> None:
    def positive_int(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1

    if not positive_int(n_samples):
        raise ValueError(f"n_samples must be a positive number of documents, got {n_samples!r}")
    if max_tokens is not None and not positive_int(max_tokens):
        raise ValueError(f"max_tokens must be None or a positive number of tokens, got {max_tokens!r}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "none"


def load_cached(path: Path, expected: dict[str, str], in_dim: Optional[int]) -> Optional[torch.Tensor]:
    """The cached matrix if its metadata matches ``expected`` and its shape is right (see the module docstring).

    Returns None (with a warning) for a file that cannot be read; raises
    :class:`~.provenance.StatsProvenanceError` for one whose provenance or shape differs, naming the fields.
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
    differences = provenance_differences(metadata, expected)
    side = in_dim if in_dim is not None else (moment.shape[0] if moment.ndim == 2 else -1)
    if tuple(moment.shape) != (side, side):
        differences["shape"] = (str(tuple(moment.shape)), str((side, side)))
    if differences:
        raise StatsProvenanceError(path, differences)
    return moment.float()


def save_moment(path: Path, moment: torch.Tensor, metadata: dict[str, str]) -> None:
    """Writes ``moment`` with its provenance ``metadata`` to ``path`` (safetensors), atomically."""
    from safetensors.torch import save_file

    with atomic_target(path) as tmp:
        save_file({_STATS_KEY: moment}, str(tmp), metadata=metadata)


def read_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The provenance metadata of a cache file (empty if it cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a foreign or broken file has no metadata we can use
        return {}


# Above this lower bound of cond(C), float32 arithmetic on C is noise (1 / eps of float32 ~ 1.7e7, with margin).
_ILL_CONDITIONED = 1e10


def check_conditioning(name: str, moment: torch.Tensor, n_tokens: Optional[int] = None,
                       device: Optional[torch.device] = None) -> Optional[str]:
    """Warns when ``C`` cannot shape an update reliably, with the numbers and the remedy; returns the warning.

    ``C`` from fewer tokens than its dimension is singular. Otherwise the pivots ``d_k`` of its Cholesky factorization
    (float64) give a lower bound ``max d / min d <= cond(C)``; a bound above 1e10, or a factorization that fails
    (``C`` not positive definite), is reported.

    Args:
        name: The module, for the message.
        moment: ``C``.
        n_tokens: The number of keys it was summed over, if known.
        device: Where to factor it (default: where it is).
    """
    dim = moment.shape[0]
    problem = None
    if n_tokens is not None and n_tokens < dim:
        problem = f"it was summed over {n_tokens} tokens, fewer than its dimension {dim}, so it is singular"
    else:
        factor, info = torch.linalg.cholesky_ex(moment.to(device=device, dtype=torch.float64))
        if int(info) > 0:
            problem = "it is not positive definite (singular, or negative from rounding)"
        else:
            pivots = factor.diagonal().square()
            bound = float(pivots.max() / pivots.min())
            if bound > _ILL_CONDITIONED:
                problem = f"its condition number is at least {bound:.2g}"
    if problem is None:
        return None
    message = (f"The second moment C of the inputs of {name} is ill-conditioned: {problem}. The updates shaped by "
               "C^-1 can come out many times larger than the weights. Compute C over more documents (mom2_n_samples) "
               "or a larger corpus, or set mom2_adjustment=False (C = I).")
    rank_zero_warn(message)
    return message
