"""Read W&B offline runs (``<save_dir>/wandb/offline-run-*/run-<id>.wandb``) from Python.

wandb 0.31 ships no Python reader for these files and writes no ``wandb-summary.json`` offline,
so tests and analysis scripts that want a run's logged metrics or config read the file directly.

The file is wandb-core's transaction log: a 7-byte header (``:W&B``, the magic 0xBEE1 as a
little-endian u16, a format-version byte) followed by the LevelDB log format. The log is cut into
32 KiB blocks counted from the start of the file, so the header occupies the first 7 bytes of
block 0. Each block holds chunks: a 7-byte header (CRC-32 u32, payload length u16, type u8: 1 full,
2 first, 3 middle, 4 last) then the payload; a block tail too short for a chunk header is zero
padding. The checksum is the standard (IEEE, zlib) CRC-32 of the type byte and the payload, not
LevelDB's masked CRC-32C. Each reassembled record is a ``wandb_internal_pb2.Record``.
"""

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto.wandb_internal_pb2 import ConfigItem, ConfigRecord, HistoryItem, Record

from framework.errors import DataFileError

__all__ = ["find_offline_runs", "read_records", "read_history", "read_config", "read_run_id", "metric_series"]

_FORMAT_VERSION = 0  # the version wandb 0.31 writes; other versions may lay records out differently
_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, _FORMAT_VERSION)
_BLOCK_SIZE = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_LAYOUT = (
    f"expected a W&B run file: the header {_FILE_HEADER!r} (':W&B', magic 0xBEE1, format version "
    f"{_FORMAT_VERSION}) then LevelDB-log chunks in 32 KiB blocks"
)


def find_offline_runs(root: str | Path, finished_within: float | None = None) -> list[Path]:
    """Every ``run-*.wandb`` file under ``root`` (recursively), oldest modification first, so the
    last entry is the most recently written run.

    With ``finished_within`` (seconds), first wait until every run file holds its exit record,
    which wandb-core writes last: ``run.finish()`` can return before the service has appended the
    last rows (seen on a loaded machine). A run still unfinished by then raises `DataFileError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFileError(f"W&B run directory {root} is not a directory")
    if finished_within is not None:
        deadline = time.monotonic() + finished_within
        for path in root.rglob("run-*.wandb"):
            while not any(record.HasField("exit") for record in read_records(path)):
                if time.monotonic() > deadline:
                    raise DataFileError(f"{path} has no exit record after {finished_within} s: the run crashed or is still writing")
                time.sleep(0.2)
    return sorted(root.rglob("run-*.wandb"), key=lambda p: (p.stat().st_mtime_ns, str(p)))


def read_records(path: str | Path) -> Iterator[Record]:
    """The protobuf records of one ``.wandb`` file, in the order they were written.

    The header is checked before this returns; chunk checksums and structure are checked while
    iterating, and either failure raises `DataFileError` naming the path. A last record cut off by
    the end of the file (a run that crashed or is still writing) is left out, because it was never
    completely written.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"W&B run file {path} does not exist; {_LAYOUT}")
    data = path.read_bytes()
    if data[: len(_FILE_HEADER)] != _FILE_HEADER:
        raise DataFileError(f"{path} starts with {data[:len(_FILE_HEADER)]!r}; {_LAYOUT}")
    return _parse_records(path, data)


def _parse_records(path: Path, data: bytes) -> Iterator[Record]:
    """Reassemble the chunks of ``data`` (a whole file, header included) into parsed records."""
    pos = len(_FILE_HEADER)
    pending: list[bytes] | None = None  # the chunks so far of a record split across blocks
    while pos < len(data):
        block_end = min(len(data), pos - pos % _BLOCK_SIZE + _BLOCK_SIZE)
        if block_end - pos < _CHUNK_HEADER.size:
            pos = block_end  # zero padding at a block's end (or a header cut off by the file's end)
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if end > block_end:
            if block_end == len(data):
                return  # the file ends inside this chunk: the writer never finished it
            raise DataFileError(f"{path}: chunk at byte {pos} runs past its 32 KiB block; {_LAYOUT}")
        if zlib.crc32(data[start - 1 : end]) != checksum:
            raise DataFileError(f"{path}: chunk at byte {pos} fails its CRC-32 check (corrupt file)")
        payload, chunk_pos, pos = data[start:end], pos, end
        if kind in (_FULL, _FIRST):
            if pending is not None:
                raise DataFileError(f"{path}: chunk at byte {chunk_pos} starts a record inside another; {_LAYOUT}")
            pending = [payload]
        elif kind in (_MIDDLE, _LAST):
            if pending is None:
                raise DataFileError(f"{path}: chunk at byte {chunk_pos} continues a record never started; {_LAYOUT}")
            pending.append(payload)
        else:
            raise DataFileError(f"{path}: chunk at byte {chunk_pos} has unknown type {kind}; {_LAYOUT}")
        if kind in (_FULL, _LAST):
            record = Record()
            try:
                record.ParseFromString(b"".join(pending))
            except DecodeError as e:
                raise DataFileError(f"{path}: record ending at byte {pos} is not a W&B Record ({e})") from None
            pending = None
            yield record


def _item_key(item: ConfigItem | HistoryItem) -> list[str]:
    """The key path of a history/config item: ``nested_key`` when set, else ``[key]``."""
    return list(item.nested_key) or [item.key]


def _decode(path: Path, item: ConfigItem | HistoryItem) -> Any:
    """The item's ``value_json`` as a Python value, or a `DataFileError` naming the key."""
    try:
        return json.loads(item.value_json)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: value of {'/'.join(_item_key(item))!r} is not JSON ({e})") from None


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """One dict per logged history row (each ``run.log`` commit), values decoded from JSON.

    Nested keys are joined with ``/``: ``log({"train/loss": x})`` and ``log({"train": {"loss": x}})``
    both give ``"train/loss"``. W&B's own ``_step``, ``_runtime`` and ``_timestamp`` are included.
    """
    path = Path(path)
    return [
        {"/".join(_item_key(item)): _decode(path, item) for item in record.history.item}
        for record in read_records(path)
        if record.HasField("history")
    ]


def _apply_config(path: Path, config: dict[str, Any], change: ConfigRecord) -> None:
    """Apply one config change in place, as wandb-core does: nested keys address nested dicts,
    updates overwrite, removals of absent keys are ignored."""
    for item in change.update:
        *parents, leaf = _item_key(item)
        node = config
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise DataFileError(f"{path}: config key {'/'.join(_item_key(item))!r} goes through a non-dict value")
        node[leaf] = _decode(path, item)
    for item in change.remove:
        *parents, leaf = _item_key(item)
        node = config
        for key in parents:
            node = node.get(key)
            if not isinstance(node, dict):
                break
        else:
            node.pop(leaf, None)


def read_config(path: str | Path) -> dict[str, Any]:
    """The run's config as the run last set it: the config given to ``wandb.init`` (carried by the
    ``run`` record) with every later ``config`` record applied in order. Includes W&B's internal
    ``_wandb`` entry as written (``{}`` for an offline run)."""
    path = Path(path)
    config: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_config(path, config, record.run.config)
        elif kind == "config":
            _apply_config(path, config, record.config)
    return config


def read_run_id(path: str | Path) -> str:
    """The run id (the ``<id>`` of ``run-<id>.wandb``), from the file's ``run`` record."""
    for record in read_records(path):
        if record.HasField("run"):
            return record.run.run_id
    raise DataFileError(f"{path} has no run record, so it names no run id")


def metric_series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every history row that logged ``key``, ready to plot or compare.

    The step is Lightning's ``trainer/global_step`` when the row has it, else W&B's ``_step``
    (which counts ``log`` calls, not optimiser steps). Values must be numbers (NaN and inf too).
    """
    return [
        (int(row.get("trainer/global_step", row["_step"])), float(row[key]))
        for row in history
        if key in row
    ]
