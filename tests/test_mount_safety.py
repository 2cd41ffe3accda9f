"""Mounting must not let writes escape tracking, and reads must work on any
backing file system.

- A process that opened a disk for writing before the mount keeps writing to
  the backing file behind vrfs's back: `vrfs mount` refuses (or, with
  --force, says which files it cannot track).
- tmpfs refuses RWF_NOWAIT reads with EOPNOTSUPP, and elsewhere RWF_NOWAIT
  returns a short count when part of the range is not cached: reads fall
  back to a plain pread instead of failing or coming back short.

Helper processes are ended by their PID; mounts are removed at teardown.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest

from mounthelpers import is_mounted
from servehelpers import vrfs_command, vrfs_env
from vrfs.fs import Datastore
from vrfs.openwriters import OpenWriter, describe, find_open_writers

pytestmark = pytest.mark.timeout(90)

# Opens every path given (w: O_WRONLY, r: O_RDONLY, m: O_RDWR, mapped shared
# and writable, then the descriptor closed), says so, and holds on until its
# standard input closes or it is killed.
HOLDER = """
import mmap, os, sys
mode, paths = sys.argv[1], sys.argv[2:]
held = []
for path in paths:
    if mode == "m":
        fd = os.open(path, os.O_RDWR)
        held.append(mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED))
        os.close(fd)
    else:
        held.append(os.open(path, os.O_WRONLY if mode == "w" else os.O_RDONLY))
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def hold():
    """hold(mode, *paths) starts a process holding the files; killed by PID at teardown."""
    procs: list[subprocess.Popen] = []

    def start(mode: str, *paths: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, mode, *map(str, paths)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline() == b"holding\n"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdin.close()
        p.stdout.close()


def refused(mount_factory, source: Path, mountpoint: Path | None = None) -> str:
    """The one line with which a mount is refused, exit status 1."""
    with pytest.raises(RuntimeError, match="vrfs mount exited with 1:") as exc:
        mount_factory(source, mountpoint)
    text = str(exc.value)
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("vrfs: ")]
    assert len(lines) == 1, text
    assert not is_mounted(mountpoint or source)
    return lines[0]


def vm_disk(source: Path, name: str = "vm1/disk.raw", size: int = 1 << 20) -> Path:
    path = source / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x5a" * size)
    return path


# ------------------------------------------------------- writers at mount time

def test_mount_over_a_file_open_for_writing_is_refused(tmp_path, mount_factory, hold):
    src = tmp_path / "src"
    writer = hold("w", vm_disk(src))
    line = refused(mount_factory, src)
    assert "open for writing" in line and "vm1/disk.raw" in line, line
    assert f"pid {writer.pid} python" in line, line
    assert "--force" in line, line


def test_mount_elsewhere_checks_the_source(tmp_path, mount_factory, hold):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    mnt.mkdir()
    writer = hold("w", vm_disk(src, "vm2/disk0.qcow2"))
    line = refused(mount_factory, src, mnt)
    assert "vm2/disk0.qcow2" in line and f"pid {writer.pid}" in line, line


def test_writable_shared_mapping_is_a_writer(tmp_path, mount_factory, hold):
    src = tmp_path / "src"
    writer = hold("m", vm_disk(src, "nvram.fd", 64 << 10))
    line = refused(mount_factory, src)
    assert f"nvram.fd (pid {writer.pid}" in line, line


def test_readers_and_state_files_do_not_block_the_mount(tmp_path, mount_factory, hold):
    src = tmp_path / "src"
    disk = vm_disk(src)
    (src / ".vrfs").mkdir()
    hold("r", disk)
    hold("w", vm_disk(src, ".vrfs/not-a-disk"))  # the state directory is vrfs's own
    m = mount_factory(src)
    assert (m.mountpoint / "vm1" / "disk.raw").read_bytes() == b"\x5a" * (1 << 20)


def test_force_mounts_and_logs_the_untracked_files(tmp_path, mount_factory, hold):
    src = tmp_path / "src"
    writer = hold("w", vm_disk(src))
    m = mount_factory(src, None, "--force")
    assert is_mounted(src)
    warning = [line for line in m.log().splitlines() if "vrfs.mount WARNING" in line]
    assert len(warning) == 1, m.log()
    assert f"vm1/disk.raw (pid {writer.pid} python" in warning[0] and "not be tracked" in warning[0]


def test_the_message_names_at_most_ten_files(tmp_path, mount_factory, hold):
    src = tmp_path / "src"
    disks = [vm_disk(src, f"vm{i:02d}/disk.raw", 4096) for i in range(13)]
    hold("w", *disks)
    line = refused(mount_factory, src)
    assert "vm09/disk.raw" in line and "vm10/disk.raw" not in line, line
    assert "and 3 more" in line, line


def test_force_is_explained_in_help():
    from mounthelpers import vrfs
    out = vrfs("mount", "--help").stdout
    assert "--force" in out and "not be tracked" in " ".join(out.split())


def test_the_scan_survives_vanishing_and_unreadable_processes(tmp_path):
    """A /proc snapshot where processes end or hide mid-scan: skipped, no error."""
    root = tmp_path / "root"
    disk = vm_disk(root)
    proc = tmp_path / "proc"
    fd_dir = proc / "100" / "fd"
    fd_dir.mkdir(parents=True)
    (proc / "100" / "fdinfo").mkdir()
    (proc / "100" / "comm").write_text("qemu-system-x86\n")
    os.symlink(disk, fd_dir / "3")
    (proc / "100" / "fdinfo" / "3").write_text("pos:\t0\nflags:\t0100002\nmnt_id:\t1\n")
    os.symlink(disk, fd_dir / "4")  # its fdinfo is gone: closed meanwhile
    os.symlink(root / "vm1" / "gone.raw", fd_dir / "5")  # dangling
    (proc / "100" / "fdinfo" / "5").write_text("flags:\t01\n")
    (proc / "200").mkdir()  # ended: no fd, no maps, no comm
    (proc / "300").mkdir()
    (proc / "300" / "fd").write_text("")  # unreadable as a directory
    (proc / "self").mkdir()
    assert find_open_writers(str(root), proc=str(proc)) == [OpenWriter("vm1/disk.raw", 100, "qemu-system-x86")]
    assert find_open_writers(str(root), proc=str(proc), ignore_pids=[100]) == []


def test_describe_groups_by_file_and_caps():
    writers = [OpenWriter("a", 1, "x"), OpenWriter("a", 2, "y"), OpenWriter("b", 1, "x")]
    assert describe(writers) == "a (pid 1 x, pid 2 y), b (pid 1 x)"
    assert describe(writers, limit=1) == "a (pid 1 x, pid 2 y) and 1 more"


# ------------------------------------------------------------ tmpfs backing

@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted in the test's directory; unmounted at teardown, after
    any vrfs mount over it (fixtures requested later are torn down first)."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    yield path
    for _ in range(3):  # a vrfs mount left on top goes first
        if not is_mounted(path):
            break
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def direct_read(path: Path, offset: int, size: int) -> bytes:
    """A read that reaches the daemon as it is (O_DIRECT: no page cache, no readahead)."""
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def test_reads_on_a_tmpfs_datastore(tmpfs, mount_factory):
    pattern = b"".join(i.to_bytes(4, "little") * 1024 for i in range(256))  # 1 MiB, 4 KiB blocks all different
    (tmpfs / "before.raw").write_bytes(pattern)  # in the page cache of the backing file only
    m = mount_factory(tmpfs)
    disk = m.mountpoint / "vm1" / "disk.raw"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.write(pattern)
        f.flush()
        os.fsync(f.fileno())
    for name in ("before.raw", "vm1/disk.raw"):
        path = m.mountpoint / name
        for offset in (0, 4096, 65536, 1 << 19, (1 << 20) - 4096):
            assert direct_read(path, offset, 4096) == pattern[offset:offset + 4096], (name, offset)
        assert direct_read(path, 8192, 64 << 10) == pattern[8192:8192 + (64 << 10)]
        assert direct_read(path, 0, 1 << 20) == pattern  # large: the threaded path
        assert direct_read(path, (1 << 20) - 4096, 8192) == pattern[-4096:]  # up to the end
        with open(path, "rb") as f:  # buffered, through the kernel's page cache
            assert f.read() == pattern
    dd = subprocess.run(["dd", f"if={disk}", "bs=4k", "skip=3", "count=2", "iflag=direct", "status=none"],
                        capture_output=True, timeout=30)
    assert dd.returncode == 0 and dd.stdout == pattern[3 * 4096:5 * 4096], dd.stderr
    img = m.mountpoint / "vm1" / "disk1.raw"
    subprocess.run(["truncate", "-s", "4M", str(img)], check=True)
    out = subprocess.run(["qemu-io", "-f", "raw", "-t", "none", "-c", "write -P 0x6b 0 2M",
                          "-c", "read -P 0x6b 4k 4k", "-c", "read -P 0x6b 1M 512",
                          "-c", "read -P 0 2M 4k", str(img)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "failed" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_read_partly_in_the_page_cache_is_read_whole(tmp_path, mount_factory):
    """RWF_NOWAIT returns what the page cache holds and stops at the first
    page it does not: a short count that is not the end of the file."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    data = os.urandom(1 << 20)
    (src / "disk.raw").write_bytes(data)
    m = mount_factory(src, mnt)
    fd = os.open(src / "disk.raw", os.O_RDONLY)  # read-only: no writer to refuse
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing cached...
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 4096, 0)  # ...but the first page
    finally:
        os.close(fd)
    got = direct_read(m.mountpoint / "disk.raw", 0, 64 << 10)
    assert len(got) == 64 << 10 and got == data[:64 << 10]
    for _ in range(2):  # across the end of the file: the page not cached, then cached
        assert direct_read(m.mountpoint / "disk.raw", (1 << 20) - 4096, 8192) == data[-4096:]


async def test_a_refused_nowait_read_is_not_retried_on_that_file(tmpfs, monkeypatch):
    """The handler itself: after tmpfs said EOPNOTSUPP once, reads of that open
    file go straight to the plain pread."""
    (tmpfs / "f").write_bytes(b"x" * 8192)
    tries = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset, flags=0):
        tries.append(flags)
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    root = os.open(tmpfs, os.O_PATH | os.O_DIRECTORY)
    fh = os.open(tmpfs / "f", os.O_RDONLY)
    try:
        ds = Datastore(root, None)
        assert [await ds.read(fh, off, 4096) for off in (0, 4096, 8192)] == [b"x" * 4096] * 2 + [b""]
        assert tries == [os.RWF_NOWAIT]
    finally:
        os.close(fh)
        os.close(root)


async def test_read_errors_still_reach_the_caller(tmp_path, monkeypatch):
    """Only refusals of RWF_NOWAIT fall back; a failing disk is EIO, as before."""
    def failing_preadv(fd, buffers, offset, flags=0):
        raise OSError(errno.EIO, "Input/output error")

    (tmp_path / "f").write_bytes(b"x" * 4096)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    fh = os.open(tmp_path / "f", os.O_RDONLY)
    monkeypatch.setattr(os, "preadv", failing_preadv)
    try:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await Datastore(root, None).read(fh, 0, 4096)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fh)
        os.close(root)


def test_sigusr1_puts_every_threads_stack_in_the_log_and_the_datastore_goes_on(datastore) -> None:
    """What `vrfs umount` asks of a daemon that does not stop: where each of
    its threads is, in its log, while it keeps serving."""
    (datastore.mountpoint / "a.raw").write_bytes(b"x" * 4096)
    os.kill(datastore.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "most recent call first" not in datastore.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "most recent call first" in datastore.log() and "vrfs/mount.py" in datastore.log(), datastore.log()
    assert (datastore.mountpoint / "a.raw").read_bytes() == b"x" * 4096
    datastore.umount()


def _holder() -> subprocess.Popen:
    """A process in a mount namespace of its own, made while the datastore is
    mounted (as `ip netns exec` or a hypervisor's per-VM namespace make
    them): it holds a copy of the mount."""
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "120"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino:
                return proc
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("unshare did not make a mount namespace")


def test_umount_names_other_mount_namespaces_that_hold_the_datastore(tmp_path, mount_factory) -> None:
    """The kernel keeps a FUSE file system, and so its daemon, while another
    mount namespace holds a copy of the mount; `vrfs umount` once waited its
    60 s out without a word. It now says who holds it and leaves the daemon
    serving them (a VM there may still write); --force ends the daemon. The
    mount point has a space and a backslash, which /proc/*/mountinfo escapes:
    matched literally, they once hid the mount and umount waited its time out."""
    src, mnt = tmp_path / "src", tmp_path / "vm store\\01"
    src.mkdir()
    mnt.mkdir()
    m = mount_factory(src, mnt)
    (mnt / "a.raw").write_bytes(b"a" * 8192)
    holder = _holder()
    try:
        started = time.monotonic()
        r = subprocess.run(vrfs_command("umount", str(mnt)), capture_output=True, text=True, env=vrfs_env(),
                           timeout=30)
        assert r.returncode == 1 and f"pid {holder.pid} (sleep)" in r.stderr, r.stderr
        assert "still mounted in other mount namespaces" in r.stderr and time.monotonic() - started < 10
        assert m.proc.poll() is None  # still serving the copy
        seen = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "cat", str(mnt / "a.raw")],
                              capture_output=True, timeout=10).stdout
        assert seen == b"a" * 8192
    finally:
        holder.kill()
        holder.wait(10)
    assert m.proc.wait(10) == 0  # the last copy gone: a clean shutdown

    m = mount_factory(src, mnt)
    holder = _holder()
    try:
        r = subprocess.run(vrfs_command("umount", "--force", str(mnt)), capture_output=True, text=True,
                           env=vrfs_env(), timeout=30)
        assert r.returncode == 0, r.stderr
        assert m.proc.wait(10) == 0
    finally:
        holder.kill()
        holder.wait(10)
