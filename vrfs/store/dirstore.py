"""`dir:PATH`: each disk's latest point is a sparse file PATH/SOURCE/PATH-IN-DATASTORE.

Zero blocks become holes. State lives in PATH/.vrfs/ (see store/base.py).
File names come only from paths checked by wire.check_path, and files are
opened without following a final symlink.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.store.base import Copy, GroupState, Store, StoreError, write_all
from vrfs.durable import fsync_dir
from vrfs.store.points import copy_extents

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class DirStore(Store):
    stages_direct = True

    def __init__(self, url: str, root: Path):
        super().__init__(url, root / ".vrfs")
        self.root = root

    def open(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store directory {self.root} is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use store directory {self.root}: {exc.strerror or exc}") from None
        if not self.root.is_dir():
            raise StoreError(f"store directory {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {self.root} is not writable")
        super().open()

    def replica(self, source: str, path: str) -> Path:
        return self.root / source / path

    def _is_file(self, p: Path) -> bool:
        try:
            return stat.S_ISREG(os.lstat(p).st_mode)
        except FileNotFoundError:
            return False

    # --- integrity -----------------------------------------------------------

    def replica_damage(self, source: str, disk: DiskEntry) -> str | None:
        try:
            st = os.lstat(self.replica(source, disk.path))
        except FileNotFoundError:
            return "is missing"
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_size != disk.size:
            return f"has {st.st_size} bytes instead of {disk.size}"
        return None

    def occupied(self, source: str, path: str) -> bool:
        # A directory there is pruned by apply if emptied, and fails it otherwise.
        try:
            return not stat.S_ISDIR(os.lstat(self.replica(source, path)).st_mode)
        except FileNotFoundError:
            return False

    def fingerprint(self, source: str, path: str) -> str | None:
        try:
            st = os.lstat(self.replica(source, path))
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}"

    def open_copy_at(self, source: str, disk: DiskEntry, known: DiskEntry | None) -> Copy | None:
        p = self.replica(source, known.path if known else disk.path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        fingerprint = f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}"
        basis = f"disk:{known.disk_id.hex()}:{fingerprint}" if known else f"seed:{fingerprint}"
        return Copy(fd, st.st_size, sparse=True, basis=basis)

    # --- apply ---------------------------------------------------------------

    def place_seed(self, source: str, disk: DiskEntry) -> None:
        seed = self.seed_dir() / disk.disk_id.hex()
        if not self._is_file(seed):
            return
        dest = self.replica(source, disk.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(seed, dest)
        fsync_dir(dest.parent)

    def replica_path(self, source: str, path: str) -> Path:
        return self.replica(source, path)

    def move_out(self, source: str, header: CycleHeader, old: dict[bytes, DiskEntry], limbo: Path,
                 adopted: dict[bytes, DiskEntry], retain_in: Path | None) -> None:
        new = {d.disk_id: d for d in header.disks}
        for disk_id, entry in old.items():
            target = new.get(disk_id)
            p = self.replica(source, entry.path)
            heir = adopted.get(disk_id)
            if heir is not None and target is not None and not self._is_file(limbo / heir.disk_id.hex()) \
                    and self._is_file(p):
                # The old disk lives on: the new one starts from a copy, made
                # before anything of this cycle touches the old one.
                copy_sparse(p, limbo / heir.disk_id.hex())
            if target is not None and target.path == entry.path:
                continue
            if self._is_file(p) and target is None and retain_in is not None \
                    and not self.points.is_lost(retain_in, disk_id):
                # An older point keeps the deleted disk whole; a copy if a new disk starts from it.
                self.points.keep_whole(retain_in, disk_id, p, entry, move=heir is None)
            if self._is_file(p):  # else already moved or removed by an earlier try
                if target is None:
                    if heir is not None:
                        os.replace(p, limbo / heir.disk_id.hex())
                    else:
                        os.unlink(p)
                else:
                    os.replace(p, limbo / disk_id.hex())
            # Emptied directories go now: a new disk of this cycle may take their name.
            self._prune(source, p.parent)
        fsync_dir(limbo)

    def _prune(self, source: str, directory: Path) -> None:
        """Remove empty directories from ``directory`` up to the source's directory; fsync what remains."""
        base = self.root / source
        while directory != base and base in directory.parents:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break  # not empty: the rest of the chain is not either
            directory = directory.parent
        if directory.is_dir():
            fsync_dir(directory)

    def move_in(self, source: str, header: CycleHeader, old: dict[bytes, DiskEntry], limbo: Path) -> None:
        for disk in header.disks:
            parked = limbo / disk.disk_id.hex()  # renamed, or a new disk's adopted start
            if self._is_file(parked):
                dest = self.replica(source, disk.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(parked, dest)

    def open_for_apply(self, source: str, disk: DiskEntry, old: DiskEntry | None, fresh: bool) -> int:
        # A file already at the path of a disk new to the store is the seed its
        # full sync was compared with (check_cycle made sure): keep it, unless
        # the comparison found no copy, in which case the disk starts empty.
        p = self.replica(source, disk.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if fresh:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, disk.size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def place_direct(self, source: str, disk: DiskEntry, staged: Path) -> None:
        dest = self.replica(source, disk.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, dest)  # made durable by sync_namespace, before the point is recorded
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # the store's directory spans file systems: copy instead
                raise
            copy_sparse(staged, dest)
            fsync_dir(dest.parent)
            os.unlink(staged)

    def zero(self, fd: int, offset: int, length: int) -> None:
        if not punch_hole(fd, offset, length):
            write_all(fd, bytes(length), offset)

    def sync_namespace(self, source: str, header: CycleHeader, old: GroupState | None) -> None:
        # New names and new directories become durable before the point is recorded.
        for d in {self.replica(source, disk.path).parent for disk in header.disks}:
            while True:
                fsync_dir(d)
                if d == self.root:
                    break
                d = d.parent


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a file's data extents (holes stay holes) to a new file, durably,
    atomically (under a temporary name first)."""
    tmp = dst.with_name(dst.name + ".tmp")
    copy_extents(src, tmp)
    os.replace(tmp, dst)
