"""Files in and out: one way to write a file or a folder so that nothing is ever half-written, one way to read
records from JSON files.

Writing. :func:`atomic_target` hands out a temporary sibling of the destination (``.<name>.tmp-<pid>-<random>``);
the caller writes the file or the folder there, and only when that succeeded is it moved onto the destination. A
crash, a kill or an exception midway leaves the destination as it was (the temporary sibling is removed, or, after a
kill, left as a dot-file that the next write of the same destination ignores). A folder that already exists is
swapped for the new one with Linux's ``renameat2(RENAME_EXCHANGE)``, so the destination holds either the old
folder or the new one, whole, at every instant; where the exchange is not available the old folder is first renamed
to a dot-sibling (``.<name>.old-...``), which :func:`atomic_target` puts back if it finds the destination missing.

Reading. :func:`json_records` reads the records of a ``.json`` file (one array) or a JSON-lines file, each with
where it was found (``"line 3"`` / ``"element 3"``). Every problem is one :class:`SourceError` naming the file and,
where it applies, the line: a file that is not UTF-8, not valid JSON, not an array, or empty. The readers of edit
requests, downstream tasks and statistics corpora all read through it and add the record's index and field.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

__all__ = ["SourceError", "atomic_target", "json_records", "read_text", "remove_path"]

_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


class SourceError(ValueError):
    """A source cannot be read: a file that is not JSON, a bad JSON line, a hub dataset that cannot be loaded.

    Args:
        source: The file path, URL or hub id.
        problem: What went wrong.
        line: 1-based line number, if the problem is on one line.
    """

    def __init__(self, source: Any, problem: str, line: Optional[int] = None) -> None:
        self.source = str(source)
        self.line = line
        self.problem = problem
        where = self.source if line is None else f"{self.source}: line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the attributes across pickling (worker processes, ddp_spawn)
        return (type(self), (self.source, self.problem, self.line))


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_target(path: Union[str, Path], keep_existing: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write a file or a folder into; moved onto ``path`` when the block succeeds.

    Args:
        path: The destination (a file or a folder).
        keep_existing: If ``path`` exists when the block ends (another process got there first), keep it and drop
            what the block wrote: for caches whose content is fixed by their name.

    Yields:
        The temporary path; the block creates the file or folder there. It is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if not tmp.exists() and not tmp.is_symlink():
            raise FileNotFoundError(f"Nothing was written to {tmp} for {path}")
        if keep_existing and path.exists():
            return
        _move_into_place(tmp, path)
    finally:
        remove_path(tmp)


def _move_into_place(tmp: Path, path: Path) -> None:
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)  # a file, or a folder onto nothing: atomic
        return
    if _exchange(tmp, path):  # tmp now holds the old folder; the finally of atomic_target removes it
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where that is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _recover(path: Path) -> None:
    """Puts back a folder that a killed swap left renamed to ``.<name>.old-*`` while ``path`` was missing."""
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], path)


def remove_path(path: Union[str, Path]) -> None:
    """Removes a file, link or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------


def read_text(path: Union[str, Path]) -> str:
    """The file's text, UTF-8 (a byte-order mark is dropped); a :class:`SourceError` if it is not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(path, f"not a UTF-8 text file ({err.reason} at byte {err.start})") from None


def json_records(path: Union[str, Path], text: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` for each record of a JSON file, in order: ``"element i"`` in a JSON array (a file
    starting with ``[``), ``"line n"`` in JSON lines (``.jsonl``, ``.ndjson``, or another file of several objects,
    one per line). Blank lines are skipped; a file holding one JSON value that is not an array is an error.

    Args:
        path: The file (named in errors).
        text: Its content, if already read.

    Raises:
        SourceError: The file is empty, not UTF-8, not valid JSON (naming the line), or its top level is not an
            array.
    """
    path = Path(path)
    text = read_text(path) if text is None else text
    if not text.strip():
        raise SourceError(path, "is empty; expected JSON records (a JSON array, or one object per line)")
    head = text.lstrip()[:1]
    lines = path.suffix.lower() in _JSON_LINES_SUFFIXES
    if not lines and head == "[":
        data = _parse_whole(path, text)
        for i, record in enumerate(data):
            yield f"element {i}", record
        return
    if not lines and (head != "{" or _is_json(text)):
        _parse_whole(path, text)  # raises: not valid JSON, or one value that is not an array
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == 1 and not lines:  # one JSON object spread over several lines
                _parse_whole(path, text)
            raise SourceError(path, f"not valid JSON: {err.msg} (column {err.colno})", line=lineno) from None
        yield f"line {lineno}", record


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _parse_whole(path: Path, text: str) -> list:
    """The file as one JSON array; a :class:`SourceError` if it is not valid JSON or not an array."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(path, f"not valid JSON: {err.msg} (column {err.colno})", line=err.lineno) from None
    if not isinstance(data, list):
        kind = "an object" if isinstance(data, dict) else type(data).__name__
        raise SourceError(path, f"expected a JSON array of records at the top level, got {kind}")
    return data
