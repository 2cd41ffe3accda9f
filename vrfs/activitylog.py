"""The activity log: which extents of which disks may hold writes that the
last checkpoint of the bitmap does not cover (after DRBD's activity log).

Files ``activity.<generation>.log`` in the state directory, append-only,
32-byte records ``disk_id 16s | extent u64 | xxh3_64 of the first 24 bytes``.
A torn or damaged tail is ignored record by record: a record is only relied on
once its fdatasync returned, and the write it announces starts after that.

Blocking calls only; the tracker runs them in worker threads.
"""

from __future__ import annotations

import os
import re
import struct
from collections import defaultdict

import xxhash

_REC = struct.Struct("<16sQ")
_SUM = struct.Struct("<Q")
RECORD_SIZE = _REC.size + _SUM.size
_NAME = re.compile(r"activity\.(\d+)\.log")


def _name(generation: int) -> str:
    return f"activity.{generation}.log"


def encode_record(disk_id: bytes, extent: int) -> bytes:
    rec = _REC.pack(disk_id, extent)
    return rec + _SUM.pack(xxhash.xxh3_64_intdigest(rec))


class ActivityLogFile:
    """One generation of the log, open for appending."""

    def __init__(self, dir_fd: int, generation: int) -> None:
        self.generation = generation
        self._fd = os.open(_name(generation), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o600, dir_fd=dir_fd)
        os.fsync(self._fd)
        os.fsync(dir_fd)  # the file's existence must survive a crash too

    def append_durably(self, records: bytes) -> None:
        view = memoryview(records)
        while view:
            view = view[os.write(self._fd, view):]
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def generations(dir_fd: int) -> list[int]:
    found = []
    for name in os.listdir(dir_fd):
        m = _NAME.fullmatch(name)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def read_hot_extents(dir_fd: int, min_generation: int = 0) -> dict[bytes, set[int]]:
    """disk_id -> extents recorded hot in every log of generation >= min_generation."""
    hot: dict[bytes, set[int]] = defaultdict(set)
    for gen in generations(dir_fd):
        if gen < min_generation:
            continue
        fd = os.open(_name(gen), os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        for pos in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
            rec = data[pos:pos + _REC.size]
            (checksum,) = _SUM.unpack_from(data, pos + _REC.size)
            if xxhash.xxh3_64_intdigest(rec) != checksum:
                continue  # torn or damaged record: its write never started
            disk_id, extent = _REC.unpack(rec)
            hot[disk_id].add(extent)
    return dict(hot)


def remove_older_than(dir_fd: int, generation: int) -> None:
    for gen in generations(dir_fd):
        if gen < generation:
            os.unlink(_name(gen), dir_fd=dir_fd)
    os.fsync(dir_fd)
