"""Mounting must not let writes escape tracking: a process that opened a disk
for writing before the mount keeps writing to the backing file behind vrfs's
back, so `vrfs mount` refuses (or, with --force, says which files it cannot
track).

Helper processes are ended by their PID; mounts are removed at teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mounthelpers import is_mounted
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
