"""The authors' layout of precomputed second moments: ROME/MEMIT's (``kmeng01/rome`` ``rome/layer_stats.py``) and
EasyEdit's (``easyeditor/models/rome/layer_stats.py``), read and written with numpy, never with pickle.

Path. ``<stats_dir>/<model_name>/<ds_name>_stats/<layer_name>_<precision>_<stats><suffix>.npz``, e.g.
``data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz``:

- ``model_name``: ROME's ``model.config._name_or_path.replace("/", "_")``; EasyEdit's ``_name_or_path`` basename;
- ``ds_name``: ``wikipedia`` or ``wikitext`` (EasyEdit also ``wikitext2``), the key of the dataset table
  (:data:`REFERENCE_DATASETS`);
- ``stats``: ``"-".join(sorted(to_collect))``, ``mom2`` for ROME, MEMIT and AlphaEdit;
- ``suffix``: ``_<sample_size>``, after ``_t{batch_tokens}`` when ``batch_tokens`` is below the model's context.
  The authors' code writes that part without the f-string, so the file name holds the literal text
  ``_t{batch_tokens}``; both spellings are read (:func:`parse_reference_path`), the literal one is written.

Content. ``numpy.savez`` of ``CombinedStat(mom2=SecondMoment()).state_dict()`` plus ``tally``'s arguments
(``util/runningstats.py``): ``mom2.constructor`` (a string), ``mom2.count`` (the number of keys ``N``), ``mom2.mom2``
(the *sum* ``sum_t k_t k_t^T`` in the file's precision; ``SecondMoment.moment()`` is ``mom2 / count``) and
``sample_size`` (``tally`` refuses a cache whose ``sample_size`` differs from its argument; ``None`` is stored as a
NaN with the bit pattern ``0xfff8000000000002``). Other statistics (``mean.*``, ``norm_mean.*``) may sit beside them.
Written files also carry ``prune_lightning.metadata``, our provenance as a JSON string, which the authors' loaders
ignore (``CombinedStat.load_state_dict`` reads only its prefixes, ``tally`` only ``sample_size``).

What these files do not carry: the tokenizer, the dataset's revision, the exact sample (ROME's ``tally`` draws a
seeded pseudorandom sample of ``sample_size`` documents, ``random_sample=1``), the model's dtype. :mod:`.exchange`
files them into the cache with what is known and marks the rest unknown.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from prune_lightning.io import atomic_target
from prune_lightning.stats.corpus import REFERENCE_CORPUS

__all__ = [
    "METADATA_KEY",
    "REFERENCE_DATASETS",
    "REFERENCE_LAYOUTS",
    "ReferenceName",
    "ReferenceStats",
    "check_layout",
    "parse_reference_path",
    "read_reference_file",
    "reference_ds_name",
    "reference_max_length",
    "reference_path",
    "write_reference_file",
]

REFERENCE_LAYOUTS = ("rome", "easyedit")

#: ``{layout: {ds_name: (what the authors' code loads, our corpus spec that stands for it)}}``. ROME loads
#: ``load_dataset("wikipedia", "20200501.en")``, a dump today's ``datasets`` cannot load: its statistics are filed
#: under :data:`~.corpus.REFERENCE_CORPUS`, its successor, with the dump recorded as ``reference_dataset``.
REFERENCE_DATASETS: dict[str, dict[str, tuple[str, str]]] = {
    "rome": {
        "wikipedia": ("wikipedia:20200501.en", REFERENCE_CORPUS),
        "wikitext": ("wikitext:wikitext-103-raw-v1", "wikitext:wikitext-103-raw-v1"),
    },
    "easyedit": {
        "wikipedia": ("wikimedia/wikipedia:20231101.en", REFERENCE_CORPUS),
        "wikitext": ("Salesforce/wikitext:wikitext-103-raw-v1", "Salesforce/wikitext:wikitext-103-raw-v1"),
        "wikitext2": ("Salesforce/wikitext:wikitext-2-raw-v1", "Salesforce/wikitext:wikitext-2-raw-v1"),
    },
}

#: Where a written file keeps our provenance (a JSON string; the authors' loaders ignore it).
METADATA_KEY = "prune_lightning.metadata"

_CONSTRUCTORS = {"rome": "util.runningstats.SecondMoment()", "easyedit": "easyeditor.util.runningstats.SecondMoment()"}
_KNOWN_STATS = ("mom2", "mean", "norm_mean")
_PRECISIONS = ("float16", "bfloat16", "float32", "float64")
_NAME = re.compile(
    r"^(?P<layer>.+)_(?P<precision>" + "|".join(_PRECISIONS) + r")_(?P<stats>[A-Za-z0-9_-]+?)"
    r"(?:_t(?P<batch_tokens>\{batch_tokens\}|\d+))?(?:_(?P<sample_size>\d+))?\.npz$"
)
_LITERAL_BATCH_TOKENS = "{batch_tokens}"
# runningstats' None: a float64 NaN with this bit pattern (box_numpy_null).
_NULL_BITS = 0xFFF8000000000002


@dataclass(frozen=True)
class ReferenceName:
    """What the path of a reference file says.

    Args:
        layer_name: The measured module, e.g. ``transformer.h.17.mlp.c_proj``.
        precision: The precision of the sums (``float32``, ``float64``, ``float16``).
        to_collect: The statistics in the file (``["mom2"]``).
        sample_size: The number of documents (None: "all", or not in the name).
        batch_tokens: The truncation length below the model's context, if the name has ``_t<n>`` (the literal
            ``_t{batch_tokens}`` of the authors' code gives ``"{batch_tokens}"``: the value is lost).
        ds_name: The dataset key, from the folder ``<ds_name>_stats`` (None if the folder is named otherwise).
        model_name: The folder above that one.
    """

    layer_name: str
    precision: str
    to_collect: tuple[str, ...]
    sample_size: Optional[int] = None
    batch_tokens: Optional[Union[int, str]] = None
    ds_name: Optional[str] = None
    model_name: Optional[str] = None


@dataclass
class ReferenceStats:
    """The content of a reference file.

    Args:
        path: The file.
        mom2: The sum ``sum_t k_t k_t^T`` (float64).
        count: ``N``, the number of keys.
        sample_size: The file's ``sample_size`` entry (None when absent or null).
        precision: The dtype the sum was stored in.
        metadata: Our provenance, when the file was written by :func:`write_reference_file`.
    """

    path: Path
    mom2: np.ndarray
    count: int
    sample_size: Optional[int] = None
    precision: str = "float32"
    metadata: dict[str, str] = field(default_factory=dict)

    def moment(self) -> torch.Tensor:
        """``C = mom2 / count`` (float64), what ``SecondMoment.moment()`` returns."""
        return torch.from_numpy(self.mom2 / self.count)


def parse_reference_path(path: Union[str, Path]) -> ReferenceName:
    """Reads layer, precision, statistics, sample size and truncation from a reference file's name, and the dataset
    and model from its folders; a ``ValueError`` naming the file if the name is not in the reference layout.

    Args:
        path: ``.../<model_name>/<ds_name>_stats/<layer>_<precision>_<stats>[_t<n>][_<sample_size>].npz``.
    """
    path = Path(path)
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(
            f"{path}: the name is not in the reference layout <layer>_<precision>_<stats>[_<sample_size>].npz "
            f"(e.g. transformer.h.17.mlp.c_proj_float32_mom2_100000.npz); give the module, corpus, n_samples and "
            "dtype explicitly"
        )
    stats = tuple(match["stats"].split("-"))
    if "mom2" not in stats or any(name not in _KNOWN_STATS for name in stats):
        raise ValueError(f"{path}: the statistics in the name are {list(stats)}; expected 'mom2' among "
                         f"{list(_KNOWN_STATS)}")
    batch_tokens: Optional[Union[int, str]] = match["batch_tokens"]
    if batch_tokens is not None and batch_tokens != _LITERAL_BATCH_TOKENS:
        batch_tokens = int(batch_tokens)
    parent = path.parent.name
    ds_name = parent[: -len("_stats")] if parent.endswith("_stats") and len(parent) > len("_stats") else None
    model_name = path.parent.parent.name if ds_name is not None and path.parent.parent.name else None
    return ReferenceName(
        layer_name=match["layer"],
        precision=match["precision"],
        to_collect=stats,
        sample_size=int(match["sample_size"]) if match["sample_size"] else None,
        batch_tokens=batch_tokens,
        ds_name=ds_name,
        model_name=model_name,
    )


def reference_path(
    stats_dir: Union[str, Path],
    model_name: str,
    ds_name: str,
    layer_name: str,
    precision: str,
    sample_size: Optional[int],
    batch_tokens: Optional[int] = None,
) -> Path:
    """Where the authors' ``layer_stats`` looks for a file (``to_collect=["mom2"]``).

    Args:
        stats_dir: Their ``STATS_DIR`` (``data/stats``) or EasyEdit's ``hparams.stats_dir``.
        model_name: ``_name_or_path`` with ``/`` replaced by ``_`` (ROME) or its basename (EasyEdit).
        ds_name: ``wikipedia``, ``wikitext``, ...
        layer_name: The module.
        precision: ``float32`` / ``float64``.
        sample_size: The number of documents (None: "all").
        batch_tokens: Given when their run used ``batch_tokens`` below the context: the name then holds
            ``_t{batch_tokens}`` literally, as their code spells it.
    """
    suffix = "" if sample_size is None else f"_{int(sample_size)}"
    if batch_tokens is not None:
        suffix = "_t" + _LITERAL_BATCH_TOKENS + suffix
    return Path(stats_dir) / model_name / f"{ds_name}_stats" / f"{layer_name}_{precision}_mom2{suffix}.npz"


def reference_ds_name(corpus: str, layout: str = "rome") -> Optional[str]:
    """The ``ds_name`` under which the authors' code of ``layout`` finds statistics of our ``corpus`` (None if it
    has none).

    Args:
        corpus: Our corpus spec.
        layout: ``"rome"`` or ``"easyedit"``.
    """
    check_layout(layout)
    for ds_name, (theirs, ours) in REFERENCE_DATASETS[layout].items():
        if corpus in (ours, theirs):
            return ds_name
    return None


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`REFERENCE_LAYOUTS`; a ``ValueError`` naming it otherwise."""
    if layout not in REFERENCE_LAYOUTS:
        raise ValueError(f"layout must be one of {list(REFERENCE_LAYOUTS)}, got {layout!r}")
    return layout


def reference_max_length(config: Any, layout: str = "rome", batch_tokens: Optional[int] = None) -> Optional[int]:
    """The truncation length of the authors' statistics for a model: its ``n_positions`` (or ``max_sequence_length``,
    ``max_position_embeddings``, ``seq_length``); EasyEdit caps Mistral at its sliding window (or 4096) and Qwen at
    4096; a ``batch_tokens`` below it wins. None if the config says nothing.

    Args:
        config: The model's config.
        layout: ``"rome"`` or ``"easyedit"``.
        batch_tokens: From the file name, if any.
    """
    check_layout(layout)
    npos = None
    for name in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        value = getattr(config, name, None)
        if value:
            npos = int(value)
            break
    model_type = str(getattr(config, "model_type", "") or "")
    if layout == "easyedit" and "mistral" in model_type:
        npos = int(getattr(config, "sliding_window", None) or 4096)
    elif layout == "easyedit" and "qwen" in model_type and npos is not None:
        npos = min(npos, 4096)
    if isinstance(batch_tokens, int) and (npos is None or batch_tokens < npos):
        return batch_tokens
    return npos


def _is_null(value: np.ndarray) -> bool:
    return (value.ndim == 0 and value.dtype == np.float64 and bool(np.isnan(value))
            and struct.unpack(">Q", struct.pack(">d", float(value)))[0] == _NULL_BITS)


def _is_whole(value: np.ndarray) -> bool:
    """A 0-d array holding a finite whole number (``tally`` stores counts as ints, old files may hold floats)."""
    if value.ndim != 0 or value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.number):
        return False
    number = float(value)
    return bool(np.isfinite(number)) and number == int(number)


def read_reference_file(
    path: Union[str, Path], in_dim: Optional[int] = None, module_name: str = "the module"
) -> ReferenceStats:
    """Reads a reference ``.npz`` (no pickle) and checks it: the keys ``mom2.mom2`` (a finite square matrix, of
    ``in_dim`` when given) and ``mom2.count`` (a positive integer). Every problem is one error naming the file and key.

    Args:
        path: The file.
        in_dim: The module's input dimension, if known.
        module_name: Named in the dimension error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Statistics file {str(path)!r} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a numpy .npz archive that loads without pickle ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz archive of the reference's SecondMoment")
    with archive:
        keys = sorted(archive.files)

        def get(key: str) -> np.ndarray:
            if key not in keys:
                raise ValueError(f"{path}: no key {key!r} (the reference's SecondMoment keeps 'mom2.mom2', the sum of "
                                 f"x x^T, and 'mom2.count'); the file holds {keys}")
            try:
                return archive[key]
            except ValueError as err:  # an object array: loading it would unpickle
                raise ValueError(f"{path}: key {key!r} is a pickled object array, refused ({err})") from None

        mom2 = get("mom2.mom2")
        count = get("mom2.count")
        sample = archive["sample_size"] if "sample_size" in keys else None
        metadata_text = get(METADATA_KEY) if METADATA_KEY in keys else None
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"{path}: key 'mom2.mom2' has shape {tuple(mom2.shape)}; expected a square matrix")
    if not np.issubdtype(mom2.dtype, np.floating):
        raise ValueError(f"{path}: key 'mom2.mom2' has dtype {mom2.dtype}; expected floating point")
    if in_dim is not None and mom2.shape[0] != in_dim:
        raise ValueError(f"{path}: key 'mom2.mom2' has shape {tuple(mom2.shape)}, but {module_name} takes inputs of "
                         f"dimension {in_dim}: expected ({in_dim}, {in_dim})")
    if not np.isfinite(mom2).all():
        raise ValueError(f"{path}: key 'mom2.mom2' holds values that are not finite")
    if not _is_whole(count) or int(count) < 1:
        raise ValueError(f"{path}: key 'mom2.count' is {count!r}; expected a positive whole number of keys")
    sample_size = None
    if sample is not None and not _is_null(sample):
        if not _is_whole(sample):
            raise ValueError(f"{path}: key 'sample_size' is {sample!r}; expected a whole number")
        sample_size = int(sample)
    metadata: dict[str, str] = {}
    if metadata_text is not None:
        try:
            metadata = {str(k): str(v) for k, v in json.loads(str(metadata_text)).items()}
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path}: key {METADATA_KEY!r} is not a JSON object ({err})") from None
    return ReferenceStats(path=path, mom2=mom2.astype(np.float64), count=int(count), sample_size=sample_size,
                          precision=str(mom2.dtype), metadata=metadata)


def write_reference_file(
    path: Union[str, Path],
    moment: torch.Tensor,
    count: int,
    sample_size: Optional[int],
    precision: str = "float32",
    layout: str = "rome",
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Writes ``C`` as the authors' ``tally`` would have cached it (``mom2 = C * count``), atomically.

    Args:
        path: The destination (:func:`reference_path`).
        moment: ``C``.
        count: ``N``, the number of keys ``C`` is the mean over.
        sample_size: The number of documents (``tally`` compares it with its own argument).
        precision: ``float32`` / ``float64``: the dtype of the stored sum.
        layout: ``"rome"`` or ``"easyedit"`` (the ``constructor`` string).
        metadata: Our provenance, stored as a JSON string under :data:`METADATA_KEY`.
    """
    check_layout(layout)
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    arrays: dict[str, np.ndarray] = {
        "mom2.constructor": np.array(_CONSTRUCTORS[layout]),
        "mom2.count": np.array(int(count), dtype=np.int64),
        "mom2.mom2": (moment.detach().cpu().double().numpy() * int(count)).astype(precision),
        "sample_size": (np.array(int(sample_size), dtype=np.int64) if sample_size is not None
                        else np.array(struct.unpack(">d", struct.pack(">Q", _NULL_BITS))[0], dtype=np.float64)),
    }
    if metadata is not None:
        arrays[METADATA_KEY] = np.array(json.dumps(metadata, sort_keys=True))
    path = Path(path)
    with atomic_target(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a name
        np.savez(f, **arrays)
    return path
