"""The staging journal of one cycle, kept in the store's own space.

A journal directory holds ``blocks`` (the cycle's block records, appended as
they arrive, uncompressed: wire.BATCH_RECORD followed by the data of a data
block) and, once the cycle is verified and durable, ``commit.json`` (the
commit record: the cycle header, block count and manifest). A journal
without a commit record is staging and is thrown away; one with a commit
record is applied, again after a crash (apply is idempotent), then removed.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

from vrfs.cycle import CycleHeader
from vrfs.durable import atomic_write, fsync_dir, remove_tree
from vrfs.wire import BATCH_RECORD, KIND_DATA, ProtocolError, header_from_json, header_to_json

READ_CHUNK = 8 << 20


def staging_reserve(fs_size: int) -> int:
    """Free space that staging leaves on the store's file system: 5 % of it,
    at most 1 GiB (VRFS_STAGING_RESERVE, in bytes, overrides). What a cycle
    may stage is bounded by what the receiver sees free, never by the disk
    sizes the peer declares (a peer may declare 1 PiB)."""
    value = os.environ.get("VRFS_STAGING_RESERVE")
    if value:
        return int(value)
    return min(1 << 30, fs_size // 20)


class DamagedJournal(OSError):
    """A commit record that cannot be read: its group's apply fails with this
    reason (an OSError, like any other failure to apply) and only that group waits."""
APPLY_ERROR_ROOM = 4096


class Journal:
    BLOCKS = "blocks"
    COMMIT = "commit.json"
    LIMBO_FILLED = "limbo-filled"  # apply progress markers, see Store.apply
    MOVED_IN = "moved-in"
    CAPTURED = "undo-captured"  # the blocks this cycle overwrites are saved under the older point
    SKIP = "skip.json"  # disks whose blocks apply leaves out (a poisoned journal, see receiver.py)
    APPLY_ERROR = "apply-error"  # why the last apply failed, for `vrfs status --store`

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @classmethod
    def create(cls, path: Path) -> Journal:
        remove_tree(path)
        path.mkdir(parents=True)
        journal = cls(path)
        # Room for the reason of a failed apply is taken now: an apply fails
        # most often because the store is full, and that is when an operator
        # most needs to read why.
        fd = os.open(path / cls.APPLY_ERROR, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(APPLY_ERROR_ROOM))
        finally:
            os.close(fd)
        journal._fd = os.open(path / cls.BLOCKS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        return journal

    def append(self, data: bytes) -> None:
        """Stage more blocks; ENOSPC (a refusal of this cycle alone) when they
        would leave less than the reserve free (staging_reserve)."""
        assert self._fd is not None
        st = os.fstatvfs(self._fd)
        reserve = staging_reserve(st.f_blocks * st.f_frsize)
        if st.f_bavail * st.f_frsize - len(data) < reserve:
            raise OSError(errno.ENOSPC, f"staging it would leave less than {_size(reserve)} free on the store's "
                                        "file system (the reserve kept for applying cycles)")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def commit(self, header: CycleHeader, count: int, manifest: str) -> None:
        """Make the staged blocks durable, then write the commit record: from here on the cycle is a point."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        fsync_dir(self.path)
        record = {"header": header_to_json(header), "blocks": count, "manifest": manifest}
        atomic_write(self.path / self.COMMIT, json.dumps(record).encode())

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        remove_tree(self.path)

    def skipped(self) -> set[bytes]:
        try:
            return {bytes.fromhex(h) for h in json.loads((self.path / self.SKIP).read_bytes())}
        except FileNotFoundError:
            return set()

    def skip(self, disk_id: bytes) -> None:
        ids = self.skipped() | {disk_id}
        atomic_write(self.path / self.SKIP, json.dumps(sorted(i.hex() for i in ids)).encode())

    def record_apply_error(self, message: str) -> None:
        """Best effort, in place, in the room taken at creation (no new space needed)."""
        text = message.encode("utf-8", "replace")[:APPLY_ERROR_ROOM]
        try:
            fd = os.open(self.path / self.APPLY_ERROR, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, text + bytes(APPLY_ERROR_ROOM - len(text)), 0)
            finally:
                os.close(fd)
        except OSError:
            pass

    def apply_error(self) -> str | None:
        try:
            text = (self.path / self.APPLY_ERROR).read_bytes().rstrip(b"\0")
        except OSError:
            return None
        return text.decode("utf-8", "replace") or None

    @property
    def committed(self) -> bool:
        return (self.path / self.COMMIT).exists()

    def header(self) -> CycleHeader:
        path = self.path / self.COMMIT
        try:
            return header_from_json(json.loads(path.read_bytes())["header"])
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            raise DamagedJournal(f"the commit record {path} is damaged: {exc}") from None

    def records(self, with_data: bool = True) -> Iterator[tuple[int, int, bytes | None]]:
        """(disk index, block index, data or None for a zero block), reading in
        large chunks; without data, the data is skipped and always None."""
        with open(self.path / self.BLOCKS, "rb", buffering=READ_CHUNK) as f:
            while True:
                head = f.read(BATCH_RECORD.size)
                if not head:
                    return
                if len(head) != BATCH_RECORD.size:
                    raise OSError(f"journal {self.path} is truncated")
                disk_index, block_index, kind, length = BATCH_RECORD.unpack(head)
                if not with_data:
                    if kind == KIND_DATA:
                        f.seek(length, os.SEEK_CUR)
                    yield disk_index, block_index, None
                    continue
                data = f.read(length) if kind == KIND_DATA else None
                if data is not None and len(data) != length:
                    raise OSError(f"journal {self.path} is truncated")
                yield disk_index, block_index, data


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
