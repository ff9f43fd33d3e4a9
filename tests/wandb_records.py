"""Reads an offline W&B run's ``run-*.wandb`` file back: its records, as the tests need them.

The file is W&B's transaction log: a 7-byte header (``:W&B``, a 2-byte magic, a 1-byte version) and then LevelDB-log
blocks of 32 KiB, each record split into chunks with a 7-byte header (CRC32 ``<I``, length ``<H``, type ``B``:
1 full, 2 first, 3 middle, 4 last). Every joined record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every record of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a W&B transaction log")
    position, pending = 7, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # the tail of a block too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        chunk = data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows (``run.log`` calls), each as ``{key: value}`` with the values decoded from JSON."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def metric_definitions(path: Path) -> dict[str, dict[str, Any]]:
    """The ``define_metric`` declarations, the last one per name or glob: ``{name: {"step_metric": ..., ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "metric":
            metric = record.metric
            name = metric.name or metric.glob_name
            out[name] = {"step_metric": metric.step_metric, "glob": bool(metric.glob_name),
                         "step_sync": metric.options.step_sync}
    return out
