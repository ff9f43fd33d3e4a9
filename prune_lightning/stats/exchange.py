"""Statistics users already have: the authors' ``.npz`` files into our cache (import), ours out in their layout
(export).

Computing ``C`` for a large model takes a GPU for hours, and the authors' files (``kmeng01/rome``'s
``data/stats/<model>/wikipedia_stats/*.npz``, EasyEdit's, files shared between users) hold the same quantity:
``C = mom2 / count`` (:mod:`.reference`).

Import (:func:`import_reference_stats`, ``prune-edit stats import``) reads such a file without pickle, checks it
(the keys, a square finite matrix of the module's input dimension, a positive count, its ``sample_size`` against the
request) and writes ``C`` to the cache file that the editors look up for the same model id, module, corpus,
``n_samples`` and dtype (:func:`.cache.stats_cache_path`), so that e.g. ``ROME.preset("gpt2-xl")`` finds it and
computes nothing. What the file does not say comes from the arguments, or from its path: the module, the precision,
the sample size, and the dataset (``wikipedia`` -> :data:`~.corpus.REFERENCE_CORPUS`, with the dump the authors used,
``20200501.en`` for ROME, recorded as ``reference_dataset``). Its metadata: every field of the request
(:func:`.cache.expected_metadata`; ``max_length`` is the authors' truncation for this model, from its config),
``n_tokens`` (the file's count), ``source="imported"``, ``imported_file`` and ``imported_sha256``, the reference's own
facts (``imported_layout``, ``reference_dataset``, ``reference_precision``, ``reference_sample_size``) and
``unknown``: the fields the file cannot know (the model revision and dtype, the tokenizer, the dataset's revision and
fingerprint, the exact sample, the forward's precision), which are then not compared when an editor asks for it
(:mod:`.provenance`). A file written by our export carries our metadata and gets it back.

Export (:func:`export_reference_stats`, ``prune-edit stats export``) writes cache files in the authors' layout -
their path, ``mom2.mom2 = C * n_tokens``, ``mom2.count = n_tokens``, ``sample_size = n_samples`` - which their
``layer_stats`` loads as its own cache, plus our metadata under ``prune_lightning.metadata``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from prune_lightning.models import get_module, input_dim, resolve_model_path
from prune_lightning.stats.cache import (accumulation_dtype, check_conditioning, expected_metadata,
                                         model_id_from_name, read_metadata, save_moment, stats_cache_path)
from prune_lightning.stats.corpus import corpus_name, file_sha256
from prune_lightning.stats.provenance import provenance_differences
from prune_lightning.stats.reference import (METADATA_KEY, REFERENCE_DATASETS, ReferenceName, check_layout,
                                             parse_reference_path, read_reference_file, reference_ds_name,
                                             reference_max_length, reference_path, write_reference_file)

__all__ = ["IMPORT_UNKNOWN", "export_reference_stats", "import_reference_stats", "model_skeleton"]

#: What an imported file cannot know (recorded as its ``unknown`` field; not compared with a request).
IMPORT_UNKNOWN = ("model_revision", "model_dtype", "tokenizer_sha256", "forward_precision", "dataset_revision",
                  "dataset_fingerprint", "sample_sha256", "n_documents")

_PATH_FIELDS = ("model_id", "module", "corpus", "n_samples", "dtype", "max_tokens")


def model_skeleton(model: str) -> tuple[Optional[Any], Optional[nn.Module]]:
    """``(config, model on the meta device)`` of a model given by name: its module names and shapes, no weights.
    ``(None, None)`` with a warning when its config cannot be read (offline, say): then nothing is checked against it.

    Args:
        model: Hub id, local directory or ``tiny:<arch>`` spec.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as err:
        rank_zero_warn(f"Could not read the config of {model!r} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                      "the module names and dimensions are not checked and max_length is recorded as unknown "
                      "(give max_length to record it).")
        return None, None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return config, skeleton


def _corpus_for(name: Optional[ReferenceName], layout: str, path: Path) -> str:
    """Our corpus spec for the file's ``<ds_name>_stats`` folder."""
    table = REFERENCE_DATASETS[layout]
    ds_name = name.ds_name if name is not None else None
    if ds_name not in table:
        raise ValueError(
            f"{path}: cannot tell the corpus: the folder names dataset {ds_name!r}, and the {layout} layout knows "
            f"{sorted(table)}; give the corpus (--corpus) the statistics were computed over"
        )
    return table[ds_name][1]


def import_reference_stats(
    files: Sequence[Union[str, Path]],
    model: str,
    modules: Optional[Sequence[str]] = None,
    corpus: Optional[str] = None,
    n_samples: Optional[int] = None,
    dtype: Optional[str] = None,
    layout: str = "rome",
    max_length: Optional[int] = None,
    model_id: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Files the authors' precomputed second moments into our cache, with their provenance (module docstring).

    Args:
        files: ``.npz`` files in the layout of ROME's (or EasyEdit's) ``layer_stats``.
        model: The model they belong to (hub id, local directory or ``tiny:<arch>``): its cache name, and, where its
            config can be read, the modules' dimensions and the authors' truncation length.
        modules: The measured module of each file (default: from the file names).
        corpus: Our corpus spec to file them under (default: from the ``<ds_name>_stats`` folder: ``wikipedia`` ->
            ``wikimedia/wikipedia:20231101.en``, ``wikitext`` -> ``wikitext:wikitext-103-raw-v1``).
        n_samples: The number of documents (default: from the file name or its ``sample_size``).
        dtype: ``float32`` / ``float64`` (default: the precision in the file name).
        layout: ``"rome"`` (kmeng01/rome, MEMIT, AlphaEdit) or ``"easyedit"``: the dataset table and truncation rule.
        max_length: The truncation length the authors used (default: their rule for this model's config).
        model_id: The model's name in the cache (default: the basename of ``model``).
        cache_dir: The cache (default: the one the editors read).
        overwrite: Replace a cache file that holds other statistics (default: refuse).

    Returns:
        ``{module: cache file}``.
    """
    check_layout(layout)
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("Give at least one .npz file to import")
    if modules is not None and len(modules) != len(files):
        raise ValueError(f"Give one module per file: {len(files)} files, {len(modules)} modules")
    config, skeleton = model_skeleton(model)
    model_id = model_id or model_id_from_name(model)
    written: dict[str, Path] = {}
    for index, path in enumerate(files):
        if not path.is_file():
            raise FileNotFoundError(f"Statistics file {str(path)!r} does not exist")
        try:
            name: Optional[ReferenceName] = parse_reference_path(path)
        except ValueError:
            if modules is None or n_samples is None or dtype is None or corpus is None:
                raise
            name = None
        module = modules[index] if modules is not None else name.layer_name
        if module in written:
            raise ValueError(f"{path}: a second file for {module} (the first: {written[module]})")
        in_dim = input_dim(get_module(skeleton, module)) if skeleton is not None else None
        stats = read_reference_file(path, in_dim=in_dim, module_name=module)
        embedded = stats.metadata
        known = REFERENCE_DATASETS[layout].get(name.ds_name if name is not None else None)
        reference_dataset = known[0] if known is not None else None
        target_corpus = corpus if corpus is not None else _corpus_for(name, layout, path)
        n_docs = (n_samples or _int(embedded.get("n_samples")) or (name.sample_size if name else None)
                  or stats.sample_size)
        if n_docs is None:
            raise ValueError(f"{path}: the number of documents is neither in its name nor in its 'sample_size'; give "
                             "n_samples")
        if stats.sample_size is not None and stats.sample_size != n_docs:
            raise ValueError(f"{path}: key 'sample_size' is {stats.sample_size}, but n_samples={n_docs} was asked for")
        precision = dtype or embedded.get("dtype") or (name.precision if name else stats.precision)
        try:
            _, dtype_name = accumulation_dtype(precision)
        except ValueError:
            raise ValueError(f"{path}: the sums are in {precision}; the cache holds float32 or float64 statistics: "
                             "give dtype='float32' (--dtype float32) to file them as such") from None
        max_tokens = _int(embedded.get("max_tokens"))
        target = stats_cache_path(model_id, module, target_corpus, n_docs, dtype_name, cache_dir=cache_dir,
                                  max_tokens=max_tokens)
        batch_tokens = name.batch_tokens if name is not None and isinstance(name.batch_tokens, int) else None
        length = max_length or (reference_max_length(config, layout, batch_tokens) if config is not None else None)
        request = expected_metadata(model_id, module, target_corpus, n_docs, dtype_name,
                                    None if embedded else length, max_tokens=max_tokens)
        sha = file_sha256(path)
        imported = {"source": "imported", "imported_file": str(path.resolve()), "imported_sha256": sha,
                    "imported_layout": layout}
        if embedded:  # our own export: its provenance comes back, checked against what it is filed as
            differences = provenance_differences(embedded, request)
            if differences:
                details = "; ".join(f"{k}: {old!r} in the file, {new!r} here" for k, (old, new) in differences.items())
                raise ValueError(f"{path}: its provenance ({METADATA_KEY}) differs from what it would be "
                                 f"filed as ({details}); give the matching arguments")
            if _int(embedded.get("n_tokens")) != stats.count:
                raise ValueError(f"{path}: key 'mom2.count' is {stats.count}, but its provenance says n_tokens="
                                 f"{embedded.get('n_tokens')}")
            metadata = dict(embedded, **imported)
        else:
            metadata = dict(request, n_tokens=str(stats.count), **imported)
            metadata["reference_precision"] = stats.precision
            if name is not None and name.sample_size is not None:
                metadata["reference_sample_size"] = str(name.sample_size)
            if name is not None and name.batch_tokens is not None:
                metadata["reference_batch_tokens"] = str(name.batch_tokens)
            if name is not None and name.ds_name is not None:
                metadata["reference_ds_name"] = name.ds_name
            if reference_dataset is not None:
                metadata["reference_dataset"] = reference_dataset
                if reference_dataset != target_corpus:
                    metadata["note"] = (f"computed by the authors over {reference_dataset}, filed under "
                                        f"{corpus_name(target_corpus)}")
            metadata["unknown"] = ",".join(IMPORT_UNKNOWN + (() if length is not None else ("max_length",)))
        if target.exists():
            existing = read_metadata(target)
            if existing.get("imported_sha256") == sha and not overwrite:
                written[module] = target  # the same file, imported before
                continue
            if not overwrite:
                raise ValueError(
                    f"{target} already holds statistics of {module} (source: {existing.get('source', 'unknown')}); "
                    "pass overwrite=True (--overwrite) to replace them with the imported ones"
                )
        moment = stats.moment().to(accumulation_dtype(dtype_name)[0])
        check_conditioning(module, moment, stats.count)
        save_moment(target, moment.contiguous(), metadata)
        written[module] = target
    return written


def _int(value: Optional[str]) -> Optional[int]:
    return int(value) if value not in (None, "") else None


def export_reference_stats(
    cache_files: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    layout: str = "rome",
    model_name: Optional[str] = None,
    ds_name: Optional[str] = None,
    batch_tokens: Optional[int] = None,
    overwrite: bool = False,
) -> dict[Path, Path]:
    """Writes cache files in the authors' layout, where their ``layer_stats`` looks for its cache (module docstring).

    Args:
        cache_files: Our cache files (``.safetensors`` with provenance, e.g. from ``prune-edit stats``).
        out_dir: Their ``stats_dir`` (``data/stats``).
        layout: ``"rome"`` or ``"easyedit"``: the dataset names and the ``constructor`` string.
        model_name: The model folder (default: the file's ``model_id``; ROME names it
            ``_name_or_path.replace("/", "_")``, e.g. ``EleutherAI_gpt-j-6B``).
        ds_name: The dataset folder ``<ds_name>_stats`` (default: the authors' name of the file's corpus,
            ``wikipedia`` for ``wikimedia/wikipedia:20231101.en``).
        batch_tokens: Give it when their run will pass ``batch_tokens`` below the model's context: the name then
            holds their literal ``_t{batch_tokens}``.
        overwrite: Replace existing files (default: refuse).

    Returns:
        ``{cache file: written .npz}``.
    """
    from safetensors import safe_open

    check_layout(layout)
    written: dict[Path, Path] = {}
    for cache_file in (Path(f) for f in cache_files):
        if not cache_file.is_file():
            raise FileNotFoundError(f"Statistics cache file {str(cache_file)!r} does not exist")
        try:
            with safe_open(str(cache_file), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                moment = f.get_tensor("mom2")
        except Exception as err:  # noqa: BLE001 - a foreign file: say which
            raise ValueError(f"{cache_file}: not a statistics cache file with a 'mom2' tensor ({err})") from None
        missing = [k for k in ("model_id", "module", "corpus", "n_samples", "dtype", "n_tokens") if not metadata.get(k)]
        if missing:
            raise ValueError(f"{cache_file}: its metadata lacks {missing}, which the reference layout needs")
        if metadata.get("max_tokens"):
            raise ValueError(f"{cache_file}: computed with a token budget (max_tokens={metadata['max_tokens']}), which "
                             "the reference layout cannot express (its loader would take it for a full sample)")
        dataset = ds_name or reference_ds_name(metadata["corpus"], layout)
        if dataset is None:
            raise ValueError(f"{cache_file}: the {layout} layout has no dataset name for corpus "
                             f"{metadata['corpus']!r}; give ds_name (--ds_name)")
        target = reference_path(out_dir, model_name or metadata["model_id"], dataset, metadata["module"],
                                metadata["dtype"], int(metadata["n_samples"]), batch_tokens=batch_tokens)
        if target.exists() and not overwrite:
            raise ValueError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
        write_reference_file(target, moment, count=int(metadata["n_tokens"]), sample_size=int(metadata["n_samples"]),
                             precision=metadata["dtype"], layout=layout, metadata=metadata)
        written[cache_file] = target
    return written
