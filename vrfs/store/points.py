"""Older points in time of a group, kept as undo data (before-images).

The replicas always hold the group's newest point. When a cycle is about to
overwrite blocks, and the store retains points, the blocks' old content is
saved first under the point the replica was at:

    points/SOURCE/GROUP/ID/point.json     the point: cycle id, cut time, disks
    points/SOURCE/GROUP/ID/undo/DISKID    before-images, each at its own offset (sparse)
    points/SOURCE/GROUP/ID/undo/DISKID.map  which blocks it holds (a bitmap)

A retained point costs the blocks that changed after it (up to the next
retained point), never a copy of its disks; a disk deleted after a point is
kept whole (its replica file moves into the point). The content of disk D at
point K is the replica, overwritten by the undo blocks of every retained
point from the newest down to K: the earliest before-image after K wins.

Pruning point M merges its undo blocks that the next older retained point P
lacks into P (copying at most M's blocks), then removes M. Both steps are
idempotent, so a crash anywhere is repaired by pruning again; no retained
point is ever lost. Capture is made durable before the replica changes and
is marked in the cycle's journal, so a redone apply never saves new content
as old.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from vrfs.bitmap import Bitmap
from vrfs.cycle import DiskEntry
from vrfs.durable import atomic_write, fsync_dir, remove_tree
from vrfs.errors import UserError
from vrfs.retention import Policy, retained
from vrfs.testhooks import crash_point
from vrfs.wire import block_length

FICLONE = 0x40049409  # share a file's extents (XFS, btrfs): a point copied in no time
COPY_CHUNK = 4 << 20


class PointLost(UserError):
    """A disk of a point cannot be rebuilt: what it was built on is gone."""


class PointStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "points"

    def group_dir(self, source: str, group: str) -> Path:
        return self.root / source / group

    def ids(self, source: str, group: str) -> list[int]:
        d = self.group_dir(source, group)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir()
                      if p.name.isdigit() and (p / "point.json").exists())

    def load(self, source: str, group: str, point: int) -> dict:
        return json.loads((self.group_dir(source, group) / str(point) / "point.json").read_bytes())

    def size(self, source: str, group: str, point: int) -> int:
        """Bytes the point's undo data takes on disk."""
        undo = self.group_dir(source, group) / str(point) / "undo"
        return sum(p.stat().st_blocks * 512 for p in undo.iterdir()) if undo.is_dir() else 0

    # --- capture ---------------------------------------------------------------

    def capture(self, source: str, group: str, point: dict, saves: dict[bytes, tuple[Path, DiskEntry, Bitmap]],
                ) -> Path:
        """Save the before-images of a cycle under the point the replica is at.

        ``point`` is the point's JSON (cycle_id, cut_time, disks); ``saves``
        maps a disk_id to (its replica, its entry at the point, the blocks the
        cycle changes). Returns the point's directory. Durable on return."""
        final = self.group_dir(source, group) / str(point["cycle_id"])
        work = final.with_name(final.name + ".capturing")
        if final.exists():
            remove_tree(work)
            return final  # an earlier try got this far
        remove_tree(work)
        (work / "undo").mkdir(parents=True)
        for disk_id, (replica, entry, blocks) in saves.items():
            self._save_blocks(replica, entry, blocks, work / "undo" / disk_id.hex())
        atomic_write(work / "point.json", json.dumps(point).encode())
        fsync_dir(work / "undo")
        os.rename(work, final)
        fsync_dir(final.parent)
        return final

    @staticmethod
    def _save_blocks(replica: Path, entry: DiskEntry, blocks: Bitmap, dest: Path) -> None:
        bs = entry.block_size
        src = os.open(replica, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(dst, entry.size)
                saved = Bitmap()
                for index in blocks:
                    if index >= entry.block_count:
                        break
                    data = os.pread(src, block_length(entry, index), index * bs)
                    if data.count(0) != len(data):  # zeros stay a hole
                        os.pwrite(dst, data, index * bs)
                    saved.set(index)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        atomic_write(Path(f"{dest}.map"), saved.to_bytes())

    @staticmethod
    def is_lost(point_dir: Path, disk_id: bytes) -> bool:
        """Whether the point records that it cannot rebuild this disk."""
        try:
            return disk_id.hex() in json.loads((point_dir / "point.json").read_bytes()).get("lost", ())
        except FileNotFoundError:
            return False

    def keep_whole(self, point_dir: Path, disk_id: bytes, replica: Path, entry: DiskEntry, move: bool) -> None:
        """A disk the cycle deletes: the point keeps its whole replica (moved
        when nothing else needs it, copied when a new disk starts from it or
        when the replica is a device that stays where it is)."""
        dest = point_dir / "undo" / disk_id.hex()
        if move:
            os.replace(replica, dest)
        else:
            copy_prefix(replica, Path(f"{dest}.tmp"), entry.size)
            os.replace(f"{dest}.tmp", dest)
        everything = Bitmap()
        everything.set_range(0, entry.block_count)
        atomic_write(Path(f"{dest}.map"), everything.to_bytes())
        fsync_dir(dest.parent)

    # --- pruning ---------------------------------------------------------------

    def prune(self, source: str, group: str, newest: tuple[int, float], policy: Policy, now: float,
              held: frozenset[int] = frozenset()) -> list[int]:
        """Remove the points the policy no longer keeps, except those ``held``
        (the point a failover hands over: an interrupted one needs it to
        finish, whatever the policy says by then); returns their ids."""
        ids = self.ids(source, group)
        cuts = {i: float(self.load(source, group, i)["cut_time"]) for i in ids}
        keep = retained([(i, c) for i, c in cuts.items()] + [newest], policy, now) | held
        pruned = []
        for point in ids:
            if point not in keep:
                self.delete(source, group, point)
                pruned.append(point)
        self._remove_stale(source, group)
        return pruned

    def delete(self, source: str, group: str, point: int) -> None:
        """Remove one retained point without changing any other: its undo
        blocks that the next older point lacks are merged into that one first."""
        older = [i for i in self.ids(source, group) if i < point]
        if older:
            self._merge(source, group, point, older[-1])
        crash_point("pruning")
        remove_tree(self.group_dir(source, group) / str(point))

    def _merge(self, source: str, group: str, point: int, into: int) -> None:
        """Blocks of ``point``'s undo that ``into`` lacks go to ``into``."""
        src_dir = self.group_dir(source, group) / str(point) / "undo"
        dst_dir = self.group_dir(source, group) / str(into) / "undo"
        older = self.load(source, group, into)
        disks = {d["disk_id"]: d for d in older["disks"]}
        # A disk the pruned point could not rebuild, the older one cannot either.
        lost = sorted(set(older.get("lost", [])) | {d for d in self.load(source, group, point).get("lost", [])
                                                    if d in disks})
        if lost != sorted(older.get("lost", [])):
            atomic_write(self.group_dir(source, group) / str(into) / "point.json",
                         json.dumps({**older, "lost": lost}).encode())
        for data in sorted(src_dir.glob("*.map")):
            disk_hex = data.name[:-len(".map")]
            entry = disks.get(disk_hex)
            if entry is None:
                continue  # the disk did not exist at the older point
            theirs = Bitmap(data.read_bytes())
            ours_map = dst_dir / f"{disk_hex}.map"
            ours = Bitmap(ours_map.read_bytes()) if ours_map.exists() else Bitmap()
            bs, size = int(entry["block_size"]), int(entry["size"])
            count = -(-size // bs)
            src = os.open(src_dir / disk_hex, os.O_RDONLY | os.O_CLOEXEC)
            try:
                dst = os.open(dst_dir / disk_hex, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    if os.fstat(dst).st_size < size:
                        os.ftruncate(dst, size)
                    for index in theirs:
                        if index >= count:
                            break
                        if ours.test(index):
                            continue  # the older point's own before-image is the earlier one
                        length = min(bs, size - index * bs)
                        block = os.pread(src, length, index * bs)
                        if block.count(0) != len(block):
                            os.pwrite(dst, block, index * bs)
                        ours.set(index)
                    os.fsync(dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            atomic_write(ours_map, ours.to_bytes())

    def _remove_stale(self, source: str, group: str) -> None:
        d = self.group_dir(source, group)
        if d.is_dir():
            for p in d.iterdir():
                if p.name.endswith(".capturing"):
                    remove_tree(p)

    def remove_group(self, source: str, group: str) -> None:
        remove_tree(self.group_dir(source, group))

    # --- reading ---------------------------------------------------------------

    def lost(self, source: str, group: str, point: int) -> dict[str, int]:
        """The disks (hex id) that ``point`` cannot rebuild, each with the
        point whose capture found its replica missing or cut short."""
        out: dict[str, int] = {}
        for undo_point in reversed([i for i in self.ids(source, group) if i >= point]):
            for disk_hex in self.load(source, group, undo_point).get("lost", ()):
                out[disk_hex] = undo_point
        return out

    def apply_undo(self, source: str, group: str, point: int, disk: DiskEntry, image: Path) -> None:
        """Turn ``image``, a copy of ``disk``'s replica at the group's newest
        point (empty if the disk was deleted since), into the disk as of the
        older ``point``: the undo blocks of every retained point from the
        newest down to ``point`` are written over it, so the earliest
        before-image after ``point`` wins. Durable on return."""
        undo_points = [i for i in self.ids(source, group) if i >= point]
        fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for undo_point in reversed(undo_points):
                undo = self.group_dir(source, group) / str(undo_point) / "undo" / disk.disk_id.hex()
                if not undo.exists():
                    continue
                blocks = Bitmap(Path(f"{undo}.map").read_bytes())
                src = os.open(undo, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    undo_size = os.fstat(src).st_size
                    for index in blocks:
                        offset = index * disk.block_size
                        if offset >= undo_size:
                            break
                        length = min(disk.block_size, undo_size - offset)
                        data = os.pread(src, length, offset)
                        os.pwrite(fd, data + bytes(length - len(data)), offset)
                finally:
                    os.close(src)
            os.ftruncate(fd, disk.size)
            os.fsync(fd)
        finally:
            os.close(fd)


def clone(src: Path, dst: Path) -> None:
    """A copy of the file ``src`` sharing its extents where the file system
    can (reflink), else a sparse copy."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    copy_extents(src, dst)


def copy_extents(src: Path, dst: Path) -> None:
    """The data extents of the file ``src`` into the new file ``dst`` (holes
    stay holes), durably. In the kernel (copy_file_range) where it can; by
    read and write where it cannot, as between two file systems of different
    types (EXDEV since Linux 5.19: a store on ext4, a target on tmpfs or XFS)."""
    from vrfs.store.base import data_extents, write_all
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(sfd).st_size
            os.ftruncate(dfd, size)
            in_kernel = True
            for start, end in data_extents(sfd, 0, size):
                offset = start
                while offset < end:
                    if in_kernel:
                        try:
                            n = os.copy_file_range(sfd, dfd, min(end - offset, 1 << 30), offset, offset)
                        except OSError as exc:
                            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                                raise
                            in_kernel = False
                            continue
                    else:
                        chunk = os.pread(sfd, min(COPY_CHUNK, end - offset), offset)
                        if chunk.count(0) != len(chunk):
                            write_all(dfd, chunk, offset)
                        n = len(chunk)
                    if n == 0:
                        break  # the file shrank meanwhile: the rest reads as zeros
                    offset += n
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def copy_prefix(src: Path, dst: Path, size: int) -> None:
    """The first ``size`` bytes of ``src`` (a file or a block device, which
    may be larger than the disk it holds) into a new file, durably. Holes of
    a file are skipped without reading; zero chunks become holes."""
    from vrfs.store.base import data_extents
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dfd, size)
            for start, end in data_extents(sfd, 0, size):
                offset = start
                while offset < end:
                    chunk = os.pread(sfd, min(COPY_CHUNK, end - offset), offset)
                    if not chunk:
                        break  # shorter than the disk: the rest reads as zeros
                    if chunk.count(0) != len(chunk):
                        os.pwrite(dfd, chunk, offset)
                    offset += len(chunk)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
