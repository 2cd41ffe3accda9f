"""Crash recovery of the tracker: kill -9 the daemon while writes run."""

import os
import subprocess
import sys
import time

import pytest

from vrfs import control
from vrfs.fs import CONTROL_XATTR

pytestmark = pytest.mark.timeout(120)

BS = 64 << 10
EXTENT = 4 << 20
PER_EXTENT = EXTENT // BS
MiB = 1 << 20

# Writes random 4 KiB O_DIRECT blocks in [start, start+span) and logs each
# offset once the write returned, until the file system goes away.
WRITER = r"""
import mmap, os, random, sys
path, start, span, logpath = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
buf = mmap.mmap(-1, 4096); buf.write(os.urandom(4096))
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
with open(logpath, "w", buffering=1) as log:
    while True:
        off = start + random.randrange(span // 4096) * 4096
        try:
            os.pwritev(fd, [buf], off)
        except OSError:
            break
        log.write(f"{off}\n")
"""


def extents_blocks(start, length):
    first, last = start // EXTENT, (start + length - 1) // EXTENT
    return set(range(first * PER_EXTENT, (last + 1) * PER_EXTENT))


def test_kill_9_recovers_every_acknowledged_write(tmp_path, mount_factory):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    env = {"VRFS_CHECKPOINT_INTERVAL": "1h"}
    m = mount_factory(src, mnt, env=env)
    disk = mnt / "vm1" / "disk.raw"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.truncate(192 * MiB)
        f.seek(0)
        f.write(b"A" * (2 * BS))  # blocks 0 and 1, then a checkpoint covers them
        f.flush()
        os.fsync(f.fileno())
    control.ask(os.fsdecode(os.getxattr(mnt, CONTROL_XATTR)), {"op": "checkpoint"})

    fio_region = (64 * MiB, 32 * MiB)
    writer_region = (128 * MiB, 32 * MiB)
    fio = subprocess.Popen(
        ["fio", "--name=load", f"--filename={disk}", f"--offset={fio_region[0]}",
         f"--size={fio_region[1]}", "--rw=randwrite", "--bs=4k", "--direct=1",
         "--ioengine=psync", "--time_based", "--runtime=30", "--fallocate=none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "writer.log"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(disk), str(writer_region[0]),
                               str(writer_region[1]), str(log)])
    try:
        time.sleep(2.5)
        m.kill()
    finally:
        for p in (fio, writer):
            if p.poll() is None:
                p.kill()
            p.wait(20)
    acknowledged = {int(line) // BS for line in log.read_text().split()}
    assert len(acknowledged) > 50, "the writer hardly wrote anything"

    m2 = mount_factory(src, mnt, env=env)
    recovered = m2.dirty_blocks("vm1/disk.raw")
    assert m2.disk("vm1/disk.raw")["state"] == "tracking"  # no full resync
    assert {0, 1} | acknowledged <= recovered
    bound = {0, 1} | extents_blocks(*fio_region) | extents_blocks(*writer_region)
    assert recovered <= bound
    assert "recovered after an unclean shutdown" in m2.log()


def test_corrupt_state_file_means_full_sync(tmp_path, mount_factory):
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src)
    (src / "d.raw").write_bytes(b"x" * BS)
    m.umount()
    states = list((src / ".vrfs" / "state").glob("*.psf"))
    assert len(states) == 1
    data = bytearray(states[0].read_bytes())
    data[40] ^= 0xFF
    states[0].write_bytes(bytes(data))
    m2 = mount_factory(src)
    d = m2.disk("d.raw")
    assert d["state"] == "needs-full-sync"
    assert "corrupt" in d["reason"]
    assert "d.raw: needs full sync: state file is corrupt (checksum mismatch)" in m2.log()


def test_missing_state_file_means_full_sync(tmp_path, mount_factory):
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src)
    (src / "d.raw").write_bytes(b"x" * BS)
    m.umount()
    for p in (src / ".vrfs" / "state").glob("*.psf"):
        p.unlink()
    m2 = mount_factory(src)
    assert m2.disk("d.raw")["state"] == "needs-full-sync"
