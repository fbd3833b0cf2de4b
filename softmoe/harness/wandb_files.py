"""Read the records of a W&B run file (``offline-run-*/run-<id>.wandb``), which offline runs leave on disk.

wandb 0.31 has no importable reader for these files (the old ``wandb.sdk.internal.datastore`` is gone;
``wandb leet inspect --json`` prints them, through the Go ``wandb-core`` binary), so this is one: a 7-byte
file header (``:W&B`` and a version), then LevelDB log blocks of 32 KiB whose records carry a 7-byte
header (CRC-32C, length, type: 1 full, 2 first, 3 middle, 4 last) and hold one protobuf
``wandb_internal_pb2.Record`` each, or its pieces.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Iterator, List, Union

from wandb.proto import wandb_internal_pb2

FILE_MAGIC = b":W&B"
FILE_HEADER_BYTES = 7
BLOCK_BYTES = 32768
RECORD_HEADER_BYTES = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Union[str, Path]) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a run file in order. A file still being written (or cut short by a killed run) ends
    at its last whole record. Checksums are not verified."""
    data = Path(path).read_bytes()
    if data[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise ValueError(f"{path} is not a W&B run file: it starts with {data[:4]!r}, not {FILE_MAGIC!r}")
    position, pending = FILE_HEADER_BYTES, b""
    while position + RECORD_HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < RECORD_HEADER_BYTES:  # the writer pads a block's tail too short for a header
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + RECORD_HEADER_BYTES])
        end = position + RECORD_HEADER_BYTES + length
        if kind == 0 or end > len(data):  # preallocated zeros, or a record not yet fully written
            return
        payload = data[position + RECORD_HEADER_BYTES : end]
        position = end
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history_steps(path: Union[str, Path]) -> List[int]:
    """The steps of the history rows a run file holds, in order (those its writer put on disk, for a killed run)."""
    return [record.history.step.num for record in read_records(path) if record.WhichOneof("record_type") == "history"]


def item_path(item) -> List[str]:
    """Where a config or history item goes: W&B fills either ``key`` or ``nested_key`` (a logged histogram
    ``routing/block2/expert_utilisation`` is stored as ``[..., "values"]``, ``[..., "bins"]``, ``[..., "_type"]``)."""
    return [item.key] if item.key else list(item.nested_key)


def is_closed(path: Union[str, Path]) -> bool:
    """Whether a run file ends with W&B's closing ``exit`` record, the last one a finished run writes."""
    last = None
    for last in read_records(path):
        pass
    return last is not None and last.WhichOneof("record_type") == "exit"


def wait_for_exit_record(run_dir: Union[str, Path], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Whether the run file in the offline run folder ``run_dir`` ends with W&B's ``exit`` record (its last) within
    ``timeout_s``. ``wandb.finish()`` returns once W&B's service has taken the exit record, which can be before its
    writer has put the file's tail on disk: a reader straight after it (``collect``, a resumed run's next attempt)
    then found a file without its last steps."""
    deadline = time.monotonic() + timeout_s
    while True:
        if any(is_closed(path) for path in Path(run_dir).glob("run-*.wandb")):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
