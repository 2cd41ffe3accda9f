"""The staging journal of one cycle, kept in the store's own space.

A journal directory holds ``blocks`` (the cycle's block records, appended as
they arrive, uncompressed: wire.BATCH_RECORD followed by the data of a data
block) and, once the cycle is verified and durable, ``commit.json`` (the
commit record: the cycle header, block count and manifest). A journal
without a commit record is staging and is thrown away; one with a commit
record is applied, again after a crash (apply is idempotent), then removed.

A disk whose blocks have no content at a committed point that a crash could
need (it starts from zeros in this cycle: a full sync that found no copy, a
disk new to the store) is not journaled block by block: its blocks go
straight into ``direct/DISKID``, the replica-to-be, sparse and already at its
size. It is fsynced before the commit record is written and renamed into
place by apply (Store.apply), so every block is written once, and the file
becomes visible only at the cycle's point. The commit record lists these
disks (``direct``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

from vrfs.bitmap import Bitmap
from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.durable import atomic_write, fsync_dir, remove_tree
from vrfs.wire import BATCH_RECORD, KIND_DATA, ProtocolError, header_from_json, header_to_json

READ_CHUNK = 8 << 20
WRITEBACK_EVERY = 32 << 20  # staged bytes of a file between starts of its writeback

_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages out (sync_file_range, without
    waiting), so that the fsync before the commit record has little left to
    do: staging and the disk's writes overlap. Best effort."""
    try:
        _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
    except (AttributeError, OSError):
        pass


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
    DIRECT = "direct"  # replicas-to-be of the disks that are staged whole (see the module's doc)

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._direct: dict[int, tuple[int, DiskEntry, Bitmap]] = {}  # disk index -> fd, disk, blocks written
        self._unflushed = 0  # bytes staged since writeback was last started

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

    def direct_path(self, disk_id: bytes) -> Path:
        return self.path / self.DIRECT / disk_id.hex()

    def start_direct(self, disks: dict[int, DiskEntry]) -> None:
        """Create the replicas-to-be of the disks (by index in the cycle) that
        are staged whole: empty, sparse, at the disk's size."""
        if not disks:
            return
        (self.path / self.DIRECT).mkdir()
        for index, disk in disks.items():
            fd = os.open(self.direct_path(disk.disk_id), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._direct[index] = (fd, disk, Bitmap())
            os.ftruncate(fd, disk.size)

    def _check_room(self, fd: int, nbytes: int) -> None:
        st = os.fstatvfs(fd)
        reserve = staging_reserve(st.f_blocks * st.f_frsize)
        if st.f_bavail * st.f_frsize - nbytes < reserve:
            raise OSError(errno.ENOSPC, f"staging it would leave less than {_size(reserve)} free on the store's "
                                        "file system (the reserve kept for applying cycles)")

    def append(self, data: bytes) -> None:
        """Stage more blocks; ENOSPC (a refusal of this cycle alone) when they
        would leave less than the reserve free (staging_reserve)."""
        assert self._fd is not None
        self._check_room(self._fd, len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._staged(len(data))

    def _staged(self, nbytes: int) -> None:
        self._unflushed += nbytes
        if self._unflushed >= WRITEBACK_EVERY:
            self._unflushed = 0
            for fd in [self._fd, *(fd for fd, _, _ in self._direct.values())]:
                if fd is not None:
                    start_writeback(fd)

    def write_direct(self, records: list[tuple[int, int, memoryview | None]]) -> None:
        """Write blocks of disks staged whole into their replicas-to-be, a run
        of consecutive blocks at a time; the same reserve as ``append``."""
        if not records:
            return
        self._check_room(next(iter(self._direct.values()))[0],
                         sum(len(data) for _, _, data in records if data is not None))
        run: list[memoryview] = []
        run_disk = run_next = run_start = -1
        for disk_index, block_index, data in records:
            _, disk, written = self._direct[disk_index]
            if data is None:
                if written.test(block_index):  # sent twice in one cycle: zero it again, in order
                    if run:
                        _pwrite_all(self._direct[run_disk][0], run, run_start)
                        run = []
                    length = min(disk.block_size, disk.size - block_index * disk.block_size)
                    _pwrite_all(self._direct[disk_index][0], [memoryview(bytes(length))],
                                block_index * disk.block_size)
                    written.clear(block_index)
                continue
            if run and (disk_index != run_disk or block_index != run_next or len(run) >= 512):
                _pwrite_all(self._direct[run_disk][0], run, run_start)
                run = []
            if not run:
                run_disk, run_start = disk_index, block_index * disk.block_size
            run.append(data)
            run_next = block_index + 1
            written.set(block_index)
        if run:
            _pwrite_all(self._direct[run_disk][0], run, run_start)
        self._staged(sum(len(data) for _, _, data in records if data is not None))

    def commit(self, header: CycleHeader, count: int, manifest: str) -> None:
        """Make the staged blocks durable, then write the commit record: from here on the cycle is a point."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        direct = []
        for index in sorted(self._direct):
            fd, disk, _ = self._direct.pop(index)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            direct.append(disk.disk_id.hex())
        if direct:
            fsync_dir(self.path / self.DIRECT)
        fsync_dir(self.path)
        record = {"header": header_to_json(header), "blocks": count, "manifest": manifest}
        if direct:
            record["direct"] = direct
        atomic_write(self.path / self.COMMIT, json.dumps(record).encode())

    def _close_direct(self) -> None:
        for fd, _, _ in self._direct.values():
            os.close(fd)
        self._direct.clear()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._close_direct()
        remove_tree(self.path)

    def direct(self) -> set[bytes]:
        """The disks of a committed cycle that were staged whole (their replicas-to-be, in ``direct/``)."""
        path = self.path / self.COMMIT
        try:
            ids = json.loads(path.read_bytes()).get("direct", [])
            return {bytes.fromhex(h) for h in ids}
        except (ValueError, TypeError, AttributeError) as exc:
            raise DamagedJournal(f"the commit record {path} is damaged: {exc}") from None

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


def _pwrite_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    while buffers:
        n = os.pwritev(fd, buffers, offset)
        offset += n
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers = buffers[1:]
        if buffers and n:
            buffers = [buffers[0][n:], *buffers[1:]]


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
