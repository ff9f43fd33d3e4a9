"""Where edit records come from: a local file, a URL (downloaded once, cached), or a Hugging Face hub dataset.

A *source* is one string, read as follows (first match wins):

- ``"hub:<dataset_id>[:<config>][@<split>]"`` - a dataset on the Hugging Face hub (or in its local cache),
  loaded with ``datasets.load_dataset(dataset_id, config, split=split)``; the split defaults to ``train`` and may
  use the ``datasets`` slice syntax (``@train[:1000]``). Example: ``"hub:azhx/counterfact"``. With
  ``HF_DATASETS_OFFLINE=1`` a dataset missing from the local cache fails at once with a :class:`SourceError`.
- ``"https://..."`` - a JSON or JSON-lines file, downloaded once into
  ``<cache>/downloads/<sha256(url)[:16]>-<basename>`` (``<cache>`` is
  :func:`prune_lightning.models.default_cache_dir`, i.e. ``$PRUNE_LIGHTNING_CACHE``) and read from there ever
  after, without the network. The download goes to a temporary file that is renamed into place, so an
  interrupted download leaves nothing behind. A URL may pin its content with ``#sha256=<hex>``: the download, and
  the cached copy at every later use, must have that digest. Plain ``http://`` is refused (the file could be
  altered on the way) unless ``allow_http=True``.
- anything else is a local path and must exist. A bare hub id is *not* guessed from a missing path: a typo in a
  path should say "no such file", not try the network. Write ``hub:`` for hub datasets.

A ``datasets.Dataset`` object may also be passed wherever a source is expected.

Files hold a list of records (dicts): ``.json`` is one JSON array, ``.jsonl`` / ``.ndjson`` one object per line
(blank lines are skipped); other suffixes are sniffed from the first character (``[`` means a JSON array).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional, Union

from prune_lightning.io import SourceError, atomic_target, json_records

__all__ = ["SourceError", "resolve_source", "read_records", "source_name"]

HUB_PREFIX = "hub:"
_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _is_dataset(obj: Any) -> bool:
    """Duck-types a ``datasets.Dataset`` without importing ``datasets`` (slow to import)."""
    return hasattr(obj, "select") and hasattr(obj, "column_names") and hasattr(obj, "__len__")


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def source_name(source: Any) -> str:
    """How a source is named in error messages: the path, the URL, ``hub:...``, or the dataset's name."""
    if _is_dataset(source):
        info = getattr(source, "info", None)
        name = getattr(info, "dataset_name", None) or "<datasets.Dataset>"
        split = getattr(source, "split", None)
        return f"{name}[{split}]" if split else str(name)
    return str(source)


def _parse_hub(spec: str) -> tuple[str, Optional[str], str]:
    """``"hub:owner/name:config@split"`` -> ``("owner/name", "config", "split")``."""
    body = spec[len(HUB_PREFIX) :]
    split = "train"
    if "@" in body:
        body, split = body.split("@", 1)
    config: Optional[str] = None
    if ":" in body:
        body, config = body.split(":", 1)
    if not body or not split or config == "":
        raise SourceError(spec, "expected 'hub:<dataset_id>[:<config>][@<split>]', e.g. 'hub:azhx/counterfact'")
    return body, config, split


def _load_hub(spec: str, revision: Optional[str] = None):
    dataset_id, config, split = _parse_hub(spec)
    import datasets  # noqa: PLC0415 - slow import, only needed here

    try:
        return datasets.load_dataset(dataset_id, config, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types; name the source in all
        offline = any(os.environ.get(var, "").upper() in ("1", "TRUE", "ON", "YES") for var in _OFFLINE_VARS)
        hint = " (offline mode is on and the dataset is not in the local cache)" if offline else ""
        problem = f"could not load hub dataset {dataset_id!r}{hint}: {type(err).__name__}: {err}"
        raise SourceError(spec, problem) from err


def _download_name(url: str) -> str:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    base = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:100]
    return f"{digest}-{base}"


def _split_digest(source: str) -> tuple[str, Optional[str]]:
    """``"https://x/f.json#sha256=ab12"`` -> ``("https://x/f.json", "ab12")``; no fragment -> ``(url, None)``."""
    url, _, fragment = source.partition("#")
    if not fragment:
        return url, None
    key, _, value = fragment.partition("=")
    value = value.strip().lower()
    if key != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise SourceError(source, "the URL's fragment must be '#sha256=<64 hex digits>' (the content's digest)")
    return url, value


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(source: str, cache_dir: Optional[Union[str, Path]], allow_http: bool = False) -> Path:
    url, expected = _split_digest(source)
    if url.startswith("http://") and not allow_http:
        raise SourceError(url, "plain http is refused: what arrives could have been altered on the way. Use https, "
                               "or pass allow_http=True (best with #sha256=<hex> to pin the content).")
    if cache_dir is None:
        from prune_lightning.models import default_cache_dir  # noqa: PLC0415 - keeps the data layer import light

        cache_dir = default_cache_dir() / "downloads"
    cache_dir = Path(cache_dir)
    target = cache_dir / _download_name(url)
    if not target.is_file():
        try:
            with atomic_target(target, keep_existing=True) as tmp:
                with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                if expected is not None and _sha256_of(tmp) != expected:
                    raise SourceError(source, f"the download's SHA-256 is {_sha256_of(tmp)}, not {expected}; "
                                              "nothing was kept")
        except (urllib.error.URLError, OSError) as err:
            raise SourceError(url, f"download failed: {err}") from err
    if expected is not None and _sha256_of(target) != expected:
        raise SourceError(source, f"the cached copy {target} has SHA-256 {_sha256_of(target)}, not {expected}; "
                                  "delete it to download the file again")
    return target


def resolve_source(source: Any, cache_dir: Optional[Union[str, Path]] = None, allow_http: bool = False,
                   revision: Optional[str] = None):
    """Turns a source into something readable: a local :class:`~pathlib.Path` or a ``datasets.Dataset``.

    URLs are downloaded on first use (see the module docstring); hub datasets are loaded; paths are checked.

    Args:
        source: Local path, ``https://`` URL (``#sha256=<hex>`` pins it), ``hub:<id>[:<config>][@<split>]``, or a
            ``datasets.Dataset``.
        cache_dir: Where downloads are kept (default: ``default_cache_dir() / "downloads"``).
        allow_http: Accept a plain ``http://`` URL.
        revision: The revision (branch, tag or commit) of a hub dataset.

    Returns:
        A ``Path`` to an existing file, or a ``datasets.Dataset``.
    """
    if _is_dataset(source):
        return source
    if isinstance(source, Path):
        path = source
    elif isinstance(source, str):
        if source.startswith(HUB_PREFIX):
            return _load_hub(source, revision)
        if _is_url(source):
            return _download(source, cache_dir, allow_http)
        path = Path(source).expanduser()
    else:
        raise TypeError(f"a data source must be a path, URL, 'hub:<id>' or datasets.Dataset, got {type(source)}")
    if not path.exists():
        raise FileNotFoundError(
            f"{source}: no such file. Sources are local files, http(s) URLs, or hub datasets written "
            f"'hub:<dataset_id>[:<config>][@<split>]'"
        )
    if not path.is_file():
        raise SourceError(source, "is not a file (expected a .json or .jsonl file of records)")
    return path


def _read_file(path: Path) -> list:
    return [record for _, record in json_records(path)]


def read_records(
    source: Any, offset: int = 0, limit: Optional[int] = None, cache_dir: Optional[Union[str, Path]] = None,
    allow_http: bool = False, revision: Optional[str] = None,
) -> tuple[str, list]:
    """Reads the records ``offset .. offset + limit`` of a source, in order.

    Records are returned as they are stored (normally dicts); checking their fields is the readers' job.

    Args:
        source: See :func:`resolve_source`.
        offset: Number of records to skip at the start.
        limit: Maximum number of records to return (``None``: all after ``offset``).
        cache_dir: Where downloads are kept.
        allow_http: Accept a plain ``http://`` URL.
        revision: The revision of a hub dataset.

    Returns:
        ``(name, records)``: the name to use in error messages (the file, or the hub spec) and the records; the
        first returned record has index ``offset`` in the source.
    """
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    resolved = resolve_source(source, cache_dir=cache_dir, allow_http=allow_http, revision=revision)
    stop = None if limit is None else offset + limit
    if isinstance(resolved, Path):
        name = f"{source} (cached at {resolved})" if isinstance(source, str) and _is_url(source) else str(resolved)
        return name, _read_file(resolved)[offset:stop]
    # a datasets.Dataset: slice before converting, hub datasets can be large
    name = source if isinstance(source, str) else source_name(resolved)
    end = len(resolved) if stop is None else min(stop, len(resolved))
    if offset >= end:
        return name, []
    part = resolved.select(range(offset, end))
    return name, part.to_list() if hasattr(part, "to_list") else list(part)
