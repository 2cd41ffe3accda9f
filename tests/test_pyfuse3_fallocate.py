"""The patched pyfuse3 (scripts/build-pyfuse3) passes fallocate(2) to Operations.fallocate.

A tiny pyfuse3 file system with one regular file, backed by a real file, runs
in a child process; every access to the mount is a child process with a time
limit too, so a broken handler fails the test instead of hanging pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest

KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
KiB, MiB = 1024, 1024 * 1024
FILL = b"\xab"

# The file system: one file, disk.img, whose fallocate logs its arguments as a
# JSON line and then does the same fallocate(2) on the backing file.
FS_SCRIPT = r'''
import ctypes, errno, json, os, stat, sys
import pyfuse3, trio

backing, mountpoint, log_path = sys.argv[1:4]
INO = pyfuse3.ROOT_INODE + 1
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

class FS(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_size = stat.S_IFDIR | 0o755, 0
        elif inode == INO:
            e.st_mode, e.st_size = stat.S_IFREG | 0o644, os.stat(backing).st_size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino, e.attr_timeout, e.entry_timeout = inode, 0, 0
        return e

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != b"disk.img":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(INO)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(backing, os.O_RDWR))

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def release(self, fh):
        os.close(fh)

    async def fallocate(self, fh, mode, offset, length):
        with open(log_path, "a") as log:
            log.write(json.dumps([mode, offset, length]) + "\n")
        if length >= 1 << 40:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if libc.fallocate(fh, mode, offset, length) != 0:
            raise pyfuse3.FUSEError(ctypes.get_errno())

pyfuse3.init(FS(), mountpoint, {"fsname=vrfs-fallocate-test", "default_permissions"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
'''


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a client of the mount as a child process with a time limit."""
    proc = subprocess.run(argv, capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def py(code: str, *args: object, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run(sys.executable, "-c", "import os, sys\n" + code, *map(str, args), check=check)


def read_through_mount(path: Path, offset: int, length: int) -> bytes:
    code = "fd = os.open(sys.argv[1], os.O_RDONLY)\nsys.stdout.buffer.write(os.pread(fd, int(sys.argv[3]), int(sys.argv[2])))"
    return py(code, path, offset, length).stdout


def size_through_mount(path: Path) -> int:
    return int(py("print(os.stat(sys.argv[1]).st_size)", path).stdout)


def supports_holes(directory: Path) -> bool:
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(MiB)
        try:
            return os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 0
        except OSError:
            return False


def unmount(mountpoint: Path) -> None:
    if not os.path.ismount(mountpoint):
        return
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=20).returncode != 0:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=20)


def end_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.timeout(90)
def test_fallocate_reaches_the_handler(tmp_path: Path) -> None:
    if not hasattr(pyfuse3.Operations, "fallocate"):
        pytest.fail("this pyfuse3 has no Operations.fallocate: run scripts/setup (scripts/build-pyfuse3)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")

    backing = tmp_path / "backing.img"
    backing.write_bytes(FILL * (256 * KiB))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "fallocate.log"
    log.touch()
    script = tmp_path / "fs.py"
    script.write_text(FS_SCRIPT)
    server_err = tmp_path / "server.stderr"
    calls_seen = 0

    def new_calls() -> list[list[int]]:
        nonlocal calls_seen
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        new, calls_seen = calls[calls_seen:], len(calls)
        return new

    with open(server_err, "wb") as err:
        server = subprocess.Popen(
            [sys.executable, str(script), str(backing), str(mountpoint), str(log)],
            stdout=err, stderr=err, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"file system did not mount: {server_err.read_text()}")
            time.sleep(0.05)
        disk = mountpoint / "disk.img"

        # posix_fallocate(3): mode 0, grows the file (the old data stays).
        py("fd = os.open(sys.argv[1], os.O_RDWR)\nos.posix_fallocate(fd, 0, 1024 * 1024)", disk)
        assert new_calls() == [[0, 0, MiB]]
        assert backing.stat().st_size == MiB
        assert size_through_mount(disk) == MiB
        assert backing.read_bytes()[: 256 * KiB] == FILL * (256 * KiB)

        # fallocate(1) preallocation, mode 0.
        run("fallocate", "-l", str(2 * MiB), str(disk))
        assert new_calls() == [[0, 0, 2 * MiB]]
        assert backing.stat().st_size == 2 * MiB
        assert size_through_mount(disk) == 2 * MiB

        # KEEP_SIZE: space past the end is allocated, the size stays.
        blocks_before = backing.stat().st_blocks
        run("fallocate", "-n", "-o", str(2 * MiB), "-l", str(MiB), str(disk))
        assert new_calls() == [[KEEP_SIZE, 2 * MiB, MiB]]
        assert backing.stat().st_size == 2 * MiB
        assert size_through_mount(disk) == 2 * MiB
        assert backing.stat().st_blocks >= blocks_before + MiB // 512

        # PUNCH_HOLE | KEEP_SIZE (qemu's discard): the range reads zeros.
        run("fallocate", "-p", "-o", str(64 * KiB), "-l", str(64 * KiB), str(disk))
        assert new_calls() == [[PUNCH_HOLE | KEEP_SIZE, 64 * KiB, 64 * KiB]]
        assert backing.stat().st_size == 2 * MiB
        data = backing.read_bytes()
        assert data[: 64 * KiB] == FILL * (64 * KiB)
        assert data[64 * KiB : 128 * KiB] == bytes(64 * KiB)
        assert data[128 * KiB : 256 * KiB] == FILL * (128 * KiB)
        assert read_through_mount(disk, 0, 256 * KiB) == data[: 256 * KiB]
        if supports_holes(tmp_path):
            with open(backing, "rb") as f:
                assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 64 * KiB

        # ZERO_RANGE: the kernel forwards it from Linux 6.x on; the backing file
        # system may still refuse it (tmpfs does), which must reach the caller.
        zero = run("fallocate", "-z", "-o", str(160 * KiB), "-l", str(32 * KiB), str(disk), check=False)
        calls = new_calls()
        if calls:
            assert calls == [[ZERO_RANGE, 160 * KiB, 32 * KiB]]
            if zero.returncode == 0:
                data = backing.read_bytes()
                assert data[160 * KiB : 192 * KiB] == bytes(32 * KiB)
                assert data[128 * KiB : 160 * KiB] == FILL * (32 * KiB)
                assert data[192 * KiB : 256 * KiB] == FILL * (64 * KiB)
            else:
                assert b"not supported" in zero.stderr
        else:
            assert zero.returncode != 0 and b"not supported" in zero.stderr  # kernel too old to forward it

        # A FUSEError from the handler reaches the caller as its errno.
        nospace = run("fallocate", "-l", str(2 << 40), str(disk), check=False)
        assert new_calls() == [[0, 0, 2 << 40]]
        assert nospace.returncode != 0 and b"No space left on device" in nospace.stderr
        assert backing.stat().st_size == 2 * MiB
    finally:
        unmount(mountpoint)
        end_process(server)
