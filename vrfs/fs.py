"""The FUSE file system: a passthrough to the backing tree that tells the
tracker about every change. Handlers translate requests and nothing more;
errno mapping happens once, in ``_errno_boundary``.

Every backing operation is relative to the backing root's descriptor, so the
datastore can be mounted over its own directory. See docs/datastore.md for the
O_DIRECT and writeback-cache decisions.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
from collections import defaultdict

import pyfuse3
import trio

from vrfs.diskxattrs import DiskAttributes, XattrError
from vrfs.inodes import InodeTable
from vrfs.layout import STATE_DIR
from vrfs.mountinfo import CONTROL_XATTR, PID_XATTR
from vrfs.tracker import Disk, Tracker

log = logging.getLogger("vrfs.fs")

RESERVED_XATTR_PREFIX = "user.vrfs."
# Reads and writes at least this large go to a worker thread so that the trio
# thread keeps dispatching requests meanwhile; smaller ones cost less inline
# than the hop to a thread.
THREAD_IO_MIN = 128 << 10
ATTR_TIMEOUT = 1.0
# How a backing file system refuses RWF_NOWAIT for good (tmpfs: EOPNOTSUPP):
# its files are read without trying it again. EAGAIN only means "not cached".
NOWAIT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(dir_fd: int, old: str, new: str, flags: int) -> None:
    if _libc.renameat2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _errno_boundary(handler):
    """OSError becomes its errno; anything unexpected is logged and becomes
    EIO, so that no bad request can end the file system."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class _Dir:
    __slots__ = ("ino", "entries")

    def __init__(self, ino: int, entries: list[str]) -> None:
        self.ino = ino
        self.entries = entries


class Datastore(pyfuse3.Operations):
    def __init__(self, root_fd: int, tracker: Tracker | None, *, writeback_cache: bool = True,
                 limiter: trio.CapacityLimiter | None = None, control_path: str = "") -> None:
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        self._root = root_fd
        self._proc_root = f"/proc/self/fd/{root_fd}"
        self._tracker = tracker
        self._limiter = limiter or trio.CapacityLimiter(4)
        self._inodes = InodeTable(os.stat(root_fd).st_ino)
        self._files: dict[int, int] = {}  # fh (= backing fd) -> FUSE inode
        self._open_fds: dict[int, set[int]] = defaultdict(set)  # FUSE inode -> fds
        self._no_nowait_reads: set[int] = set()  # fhs whose file system refuses RWF_NOWAIT
        self._dirs: dict[int, _Dir] = {}
        self._next_dir = 1
        self._control_path = control_path
        self._euid = os.geteuid()
        # The user.vrfs.* settings and live values of disks (vrfs/diskxattrs.py), once the mount has them.
        self.disk_attributes: DiskAttributes | None = None

    # ------------------------------------------------------------ helpers

    def _attr(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inodes.fuse_ino(st.st_ino)
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _lstat(self, path: str) -> os.stat_result:
        return os.stat(path, dir_fd=self._root, follow_symlinks=False)

    def _child(self, parent: int, name: bytes, new: bool = False) -> str:
        """The backing path of ``name`` in ``parent``. The state directory does
        not exist up here, and its name cannot be taken (``new``)."""
        sname = os.fsdecode(name)
        if parent == pyfuse3.ROOT_INODE and sname == STATE_DIR:
            raise pyfuse3.FUSEError(errno.EPERM if new else errno.ENOENT)
        return self._inodes.child(parent, sname)

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        attr = self._attr(self._lstat(path))
        self._inodes.remember(attr.st_ino, path)
        return attr

    def _own(self, path: str, ctx: pyfuse3.RequestContext) -> None:
        """Running as root, new entries belong to the caller, as on a local disk."""
        if self._euid == 0 and (ctx.uid, ctx.gid) != (0, 0):
            os.chown(path, ctx.uid, ctx.gid, dir_fd=self._root, follow_symlinks=False)

    def _disk(self, ino: int) -> Disk | None:
        if self._tracker is None:
            return None
        return self._tracker.disk(self._inodes.backing_ino(ino))

    async def _io(self, size: int, fn, *args):
        if size >= THREAD_IO_MIN:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        return fn(*args)

    def _forget_disk_if_gone(self, st: os.stat_result) -> None:
        if self._tracker is not None and stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            self._tracker.removed(st.st_ino)

    # --------------------------------------------------------- namespace

    @_errno_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        return self._entry(self._child(parent_inode, name))

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self._inodes.forget(ino, count)

    @_errno_boundary
    async def getattr(self, inode, ctx=None):
        fds = self._open_fds.get(inode)
        if fds:  # also answers for open files that have no name any more
            return self._attr(os.fstat(next(iter(fds))))
        return self._attr(self._lstat(self._inodes.path(inode)))

    @_errno_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = None if fh is not None else self._inodes.path(inode)
        if fields.update_size:
            await self._truncate(inode, path, fh, attr.st_size)
        if fields.update_mode:
            if fh is not None:
                os.fchmod(fh, stat.S_IMODE(attr.st_mode))
            else:
                assert path is not None  # looked up above when there is no fh
                if not stat.S_ISLNK(self._lstat(path).st_mode):
                    os.chmod(path, stat.S_IMODE(attr.st_mode), dir_fd=self._root)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fh is not None:
                os.fchown(fh, uid, gid)
            else:
                assert path is not None  # looked up above when there is no fh
                os.chown(path, uid, gid, dir_fd=self._root, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            if fh is not None:
                st = os.fstat(fh)
            else:
                assert path is not None  # looked up above when there is no fh
                st = self._lstat(path)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            if fh is not None:
                os.utime(fh, ns=times)
            else:
                assert path is not None
                os.utime(path, ns=times, dir_fd=self._root, follow_symlinks=False)
        return await self.getattr(inode, ctx)

    async def _truncate(self, inode: int, path: str | None, fh: int | None, size: int) -> None:
        if fh is not None:
            fd = fh
        else:
            assert path is not None  # the caller looks the path up when there is no fh
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=self._root)
        try:
            disk = self._disk(inode)
            if disk is None:
                await trio.to_thread.run_sync(os.ftruncate, fd, size, limiter=self._limiter)
                return
            old = os.fstat(fd).st_size
            assert self._tracker is not None  # a disk is only known through the tracker
            group = await self._tracker.begin_write(disk, *self._tracker.resize_range(old, size))
            try:
                await trio.to_thread.run_sync(os.ftruncate, fd, size, limiter=self._limiter)
                disk.size = size
            finally:
                self._tracker.end_write(group)
        finally:
            if fh is None:
                os.close(fd)

    @_errno_boundary
    async def readlink(self, inode, ctx):
        return os.readlink(os.fsencode(self._inodes.path(inode)), dir_fd=self._root)

    @_errno_boundary
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name, new=True)
        os.mkdir(path, mode & ~ctx.umask, dir_fd=self._root)
        self._own(path, ctx)
        return self._entry(path)

    @_errno_boundary
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name, new=True)
        os.mknod(path, mode & ~ctx.umask, rdev, dir_fd=self._root)
        self._own(path, ctx)
        attr = self._entry(path)
        if stat.S_ISREG(mode) and self._tracker is not None:
            self._tracker.created(self._inodes.backing_ino(attr.st_ino), path)
        return attr

    @_errno_boundary
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name, new=True)
        os.symlink(target, os.fsencode(path), dir_fd=self._root)
        self._own(path, ctx)
        return self._entry(path)

    @_errno_boundary
    async def link(self, inode, new_parent_inode, new_name, ctx):
        new_path = self._child(new_parent_inode, new_name, new=True)
        os.link(self._inodes.path(inode), new_path, src_dir_fd=self._root, dst_dir_fd=self._root,
                follow_symlinks=False)
        return self._entry(new_path)

    async def _other_name(self, st: os.stat_result, path: str) -> str | None:
        """Another name of a hard-linked disk whose tracked name ``path`` is
        about to go; looked up before the change, so no await comes between
        the backing change and the tracker's."""
        if self._tracker is None or st.st_nlink <= 1 or not self._tracker.tracks(st.st_ino, path):
            return None
        known = self._inodes.other_path(self._inodes.fuse_ino(st.st_ino), path)
        if known is not None:
            return known
        return await trio.to_thread.run_sync(self._tracker.find_name, st.st_ino, path, limiter=self._limiter)

    @_errno_boundary
    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        st = self._lstat(path)
        other = await self._other_name(st, path)
        os.unlink(path, dir_fd=self._root)
        ino = self._inodes.fuse_ino(st.st_ino)
        self._inodes.unlinked(ino, path)
        if st.st_nlink > 1 and self._tracker is not None:
            self._tracker.name_removed(st.st_ino, path, other)
        self._forget_disk_if_gone(st)

    @_errno_boundary
    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        st = self._lstat(path)
        os.rmdir(path, dir_fd=self._root)
        self._inodes.unlinked(self._inodes.fuse_ino(st.st_ino), path)

    @_errno_boundary
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new, new=True)
        try:
            replaced = self._lstat(new)
        except FileNotFoundError:
            replaced = None
        other = await self._other_name(replaced, new) if replaced is not None else None
        if flags:
            renameat2(self._root, old, new, flags)
        else:
            os.rename(old, new, src_dir_fd=self._root, dst_dir_fd=self._root)
        if flags & RENAME_EXCHANGE:
            self._inodes.exchanged(old, new)
            if self._tracker is not None:
                self._tracker.exchanged(old, new)
            return
        if replaced is not None:
            ino = self._inodes.fuse_ino(replaced.st_ino)
            self._inodes.unlinked(ino, new)
            if replaced.st_nlink > 1 and self._tracker is not None:  # a name of a hard-linked disk
                self._tracker.name_removed(replaced.st_ino, new, other)
            self._forget_disk_if_gone(replaced)
        self._inodes.renamed(old, new)
        if self._tracker is not None:
            self._tracker.renamed(old, new)

    # ------------------------------------------------------- directories

    @_errno_boundary
    async def opendir(self, inode, ctx):
        path = self._inodes.path(inode)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        if inode == pyfuse3.ROOT_INODE:
            names = [n for n in names if n != STATE_DIR]
        # A snapshot taken at opendir: offsets stay meaningful however the
        # directory changes while it is being read.
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = _Dir(inode, names)
        return fh

    @_errno_boundary
    async def readdir(self, fh, start_id, token):
        d = self._dirs[fh]
        for index in range(start_id, len(d.entries)):
            name = d.entries[index]
            path = self._inodes.child(d.ino, name)
            try:
                attr = self._attr(self._lstat(path))
            except FileNotFoundError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index + 1):
                return
            self._inodes.remember(attr.st_ino, path)

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_errno_boundary
    async def fsyncdir(self, fh, datasync):
        path = self._inodes.path(self._dirs[fh].ino)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root)
        try:
            await trio.to_thread.run_sync(os.fsync, fd, limiter=self._limiter)
        finally:
            os.close(fd)

    @_errno_boundary
    async def statfs(self, ctx):
        sv = os.statvfs(self._proc_root)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(s, name, getattr(sv, name))
        return s

    # ------------------------------------------------------------- files

    def _backing_flags(self, flags: int) -> int:
        # O_DIRECT: the kernel bypasses its page cache for this open (direct_io
        # below); the backing file is used buffered, since Python's buffers are
        # not aligned. O_APPEND: offsets come from the kernel, and pwrite on an
        # O_APPEND descriptor would ignore them. O_WRONLY: with the writeback
        # cache the kernel may read to fill partial pages.
        flags &= ~(os.O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_CLOEXEC

    def _file_info(self, fd: int, inode: int, flags: int) -> pyfuse3.FileInfo:
        self._files[fd] = inode
        self._open_fds[inode].add(fd)
        fi = pyfuse3.FileInfo(fh=fd)
        fi.direct_io = bool(flags & os.O_DIRECT)
        fi.keep_cache = not fi.direct_io
        if fi.direct_io:  # the caller does its own caching: readahead only wastes the disk's time
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fi

    @_errno_boundary
    async def open(self, inode, flags, ctx):
        path = self._inodes.path(inode)
        # O_TRUNC is done as a tracked truncate after the open, never by the
        # backing open itself: tracking comes before the change.
        fd = os.open(path, self._backing_flags(flags) & ~os.O_TRUNC, dir_fd=self._root)
        try:
            if flags & os.O_TRUNC:
                await self._truncate(inode, None, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return self._file_info(fd, inode, flags)

    @_errno_boundary
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name, new=True)
        fd = os.open(path, self._backing_flags(flags) | os.O_CREAT, mode & ~ctx.umask, dir_fd=self._root)
        try:
            self._own(path, ctx)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        attr = self._attr(st)
        self._inodes.remember(attr.st_ino, path)
        if self._tracker is not None:
            self._tracker.created(st.st_ino, path, st.st_size)
        return self._file_info(fd, attr.st_ino, flags), attr

    def _read_cached(self, fh: int, off: int, size: int) -> bytes:
        """What the page cache holds from ``off`` on, up to ``size`` bytes,
        without waiting for the disk: possibly nothing, possibly a prefix."""
        buf = bytearray(size)
        try:
            n = os.preadv(fh, [buf], off, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in NOWAIT_UNSUPPORTED:
                self._no_nowait_reads.add(fh)
            elif exc.errno != errno.EAGAIN:
                raise
            return b""
        del buf[n:]
        return bytes(buf)

    @_errno_boundary
    async def read(self, fh, off, size):
        head = b""
        if size < THREAD_IO_MIN and fh not in self._no_nowait_reads:
            # Served inline only if the page cache has it all: a read that
            # would wait for the disk goes to a thread, so the loop keeps
            # dispatching.
            head = self._read_cached(fh, off, size)
            if len(head) == size or (head and off + len(head) >= os.fstat(fh).st_size):
                return head
        # A short RWF_NOWAIT read stops at the first page not cached, not only
        # at the end of the file; returned as it is, the kernel would take it
        # for the end of the file (zeros in its page cache, a short read for
        # O_DIRECT). So it is returned only at the end of the file, and the
        # rest is read here otherwise.
        rest = await trio.to_thread.run_sync(os.pread, fh, size - len(head), off + len(head),
                                             limiter=self._limiter)
        return head + rest

    @_errno_boundary
    async def write(self, fh, off, buf):
        disk = self._disk(self._files[fh])
        if disk is None:
            return await self._io(len(buf), os.pwrite, fh, buf, off)
        assert self._tracker is not None  # a disk is only known through the tracker
        group = await self._tracker.begin_write(disk, off, len(buf))
        try:
            written = await self._io(len(buf), os.pwrite, fh, buf, off)
        finally:
            self._tracker.end_write(group)
        self._tracker.wrote(disk, off, written)
        return written

    @_errno_boundary
    async def fallocate(self, fh, mode, offset, length):
        disk = self._disk(self._files[fh])
        changes_content = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)
        old = os.fstat(fh).st_size
        grows = not mode & FALLOC_FL_KEEP_SIZE and offset + length > old
        if disk is None or not (changes_content or grows):
            await trio.to_thread.run_sync(fallocate, fh, mode, offset, length, limiter=self._limiter)
            return
        assert self._tracker is not None  # a disk is only known through the tracker
        span = (offset, length) if changes_content else self._tracker.resize_range(old, offset + length)
        group = await self._tracker.begin_write(disk, *span)
        try:
            await trio.to_thread.run_sync(fallocate, fh, mode, offset, length, limiter=self._limiter)
        finally:
            self._tracker.end_write(group)
        if grows:
            disk.size = max(disk.size, offset + length)

    async def flush(self, fh):
        pass  # nothing is buffered here; fsync is what makes data durable

    @_errno_boundary
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh, limiter=self._limiter)

    async def release(self, fh):
        self._no_nowait_reads.discard(fh)
        inode = self._files.pop(fh, None)
        if inode is not None:
            fds = self._open_fds[inode]
            fds.discard(fh)
            if not fds:
                del self._open_fds[inode]
        os.close(fh)

    # --------------------------------------------------- extended attributes

    def _xattr_path(self, inode: int) -> str:
        path = self._inodes.path(inode)
        return self._proc_root if path == "." else f"{self._proc_root}/{path}"

    def _vrfs_attr(self, inode: int, sname: str) -> tuple[Disk, DiskAttributes] | None:
        disk = self._disk(inode)
        if disk is None or self.disk_attributes is None or not sname.startswith(RESERVED_XATTR_PREFIX):
            return None
        return disk, self.disk_attributes

    def _not_a_disk(self, inode: int, sname: str) -> pyfuse3.FUSEError:
        """EPERM for a vrfs setting on what is not a tracked disk, with the reason in the log."""
        if self.disk_attributes is None:
            why = "this mount does not track (--no-tracking)"
        else:
            why = ("settings are per disk, a regular file of the datastore; for a group's disks at once, "
                   "a [[rule]] of --config (docs/settings.md)")
        log.warning("%s: %s refused: %s", self._inodes.path(inode), sname, why)
        return pyfuse3.FUSEError(errno.EPERM)

    @_errno_boundary
    async def getxattr(self, inode, name, ctx):
        sname = os.fsdecode(name)
        if sname.startswith(RESERVED_XATTR_PREFIX):
            if inode == pyfuse3.ROOT_INODE and sname == CONTROL_XATTR and self._control_path:
                return os.fsencode(self._control_path)
            if inode == pyfuse3.ROOT_INODE and sname == PID_XATTR:
                return str(os.getpid()).encode()
            if (found := self._vrfs_attr(inode, sname)) is not None:
                return _xattr_call(found[1].get, found[0], sname)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return os.getxattr(self._xattr_path(inode), name, follow_symlinks=False)

    @_errno_boundary
    async def setxattr(self, inode, name, value, ctx):
        sname = os.fsdecode(name)
        if sname.startswith(RESERVED_XATTR_PREFIX):
            if (found := self._vrfs_attr(inode, sname)) is None:
                raise self._not_a_disk(inode, sname)
            return await _xattr_await(found[1].set(found[0], sname, value))
        os.setxattr(self._xattr_path(inode), name, value, follow_symlinks=False)

    @_errno_boundary
    async def listxattr(self, inode, ctx):
        names = [os.fsencode(n) for n in os.listxattr(self._xattr_path(inode), follow_symlinks=False)]
        if self.disk_attributes is not None and self._disk(inode) is not None:
            names += [n.encode() for n in self.disk_attributes.names()]
        return names

    @_errno_boundary
    async def removexattr(self, inode, name, ctx):
        sname = os.fsdecode(name)
        if sname.startswith(RESERVED_XATTR_PREFIX):
            if (found := self._vrfs_attr(inode, sname)) is None:
                raise self._not_a_disk(inode, sname)
            return await _xattr_await(found[1].remove(found[0], sname))
        os.removexattr(self._xattr_path(inode), name, follow_symlinks=False)


def _xattr_call(fn, *args):
    try:
        return fn(*args)
    except XattrError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None


async def _xattr_await(call):
    try:
        return await call
    except XattrError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None
