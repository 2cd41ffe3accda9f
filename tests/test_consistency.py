"""Point-in-time consistency, the core promise.

A writer stamps 4 KiB blocks of three disks of one group with an increasing
sequence number (O_DIRECT, one write at a time, each logged before it is
issued). Meanwhile the receiver and the source daemon are killed with SIGKILL
at random moments and restarted. After each recovery the replica group must
equal the source at one cut: for some k, every write <= k is in and none > k,
on every disk at once.
"""

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounthelpers import Mount
from servehelpers import Server, free_port

pytestmark = pytest.mark.timeout(240)

DISKS = 3
DISK_SIZE = 8 << 20
SLOT = 4096
SLOTS = DISK_SIZE // SLOT
STAMP = struct.Struct("<QQQ")  # seq, disk, slot

WRITER = r"""
import mmap, os, random, struct, sys, time
mnt, logpath, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
DISKS, SLOTS, SLOT = %d, %d, %d
stamp = struct.Struct("<QQQ")
fds = [os.open(f"{mnt}/vm1/d{d}.raw", os.O_RDWR | os.O_DIRECT) for d in range(DISKS)]
buf = mmap.mmap(-1, SLOT)
with open(logpath, "a", buffering=1) as log:
    while True:
        d, s = random.randrange(DISKS), random.randrange(SLOTS)
        buf.seek(0)
        buf.write(stamp.pack(seq, d, s) * (SLOT // stamp.size) + bytes(SLOT %% stamp.size))
        log.write(f"{seq} {d} {s}\n")
        try:
            os.pwritev(fds[d], [buf], s * SLOT)
        except OSError:
            log.write(f"failed {seq}\n")
            break
        seq += 1
        if seq %% 64 == 0:
            time.sleep(0.01)
""" % (DISKS, SLOTS, SLOT)


def read_log(path: Path):
    writes, failed = [], set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "failed":
            failed.add(int(parts[1]))
        elif len(parts) == 3:
            writes.append(tuple(int(x) for x in parts))
    return writes, failed


def replica_stamps(store: Path) -> dict[tuple[int, int], int]:
    out = {}
    for d in range(DISKS):
        data = (store / "site1" / "vm1" / f"d{d}.raw").read_bytes()
        assert len(data) == DISK_SIZE
        for s in range(SLOTS):
            block = data[s * SLOT:(s + 1) * SLOT]
            seq, disk, slot = STAMP.unpack_from(block)
            if seq:
                assert (disk, slot) == (d, s), "a block landed in the wrong place"
                assert block == STAMP.pack(seq, d, s) * (SLOT // STAMP.size) + bytes(SLOT % STAMP.size), \
                    "a torn block"
            else:
                assert block == bytes(SLOT)
            out[(d, s)] = seq
    return out


def check_one_cut(store: Path, log: Path) -> int:
    """The k at which the replica cuts the write history; fails if there is none."""
    writes, failed = read_log(log)
    seen = replica_stamps(store)
    k = max(seen.values())
    history: dict[tuple[int, int], list[int]] = {}
    for seq, d, s in writes:
        if seq <= k:
            history.setdefault((d, s), []).append(seq)
    for loc, seq in seen.items():
        allowed = {0}
        for w in history.get(loc, []):
            if w in failed:
                allowed.add(w)  # may or may not have reached the disk
            else:
                allowed = {w}
        assert seq in allowed, f"slot {loc}: replica has write {seq}, the cut at {k} needs {sorted(allowed)}"
    return k


def wait_in_sync(mount: Mount, deadline: float) -> None:
    while time.monotonic() < deadline:
        disks = mount.status()
        if len(disks) == DISKS and all(d["state"] == "in-sync" for d in disks):
            return
        time.sleep(0.2)
    raise AssertionError(f"not in sync: {mount.status()}\n{mount.log()[-3000:]}")


def test_replica_is_always_at_one_cut(tmp_path, mount_factory):
    rng = random.Random(int(os.environ.get("VRFS_TEST_SEED", "0")) or None)
    src, mnt, store = tmp_path / "src", tmp_path / "mnt", tmp_path / "store"
    for p in (src, mnt, store):
        p.mkdir()
    port = free_port()
    receiver = Server(f"dir:{store}", tmp_path / "serve.log", port=port).start()
    args = ("--peer", f"127.0.0.1:{port}", "--name", "site1", "--rpo", "1s")
    mount = mount_factory(src, mnt, *args)
    writer = None
    log = tmp_path / "writes.log"
    try:
        (mnt / "vm1").mkdir()
        for d in range(DISKS):
            with open(mnt / "vm1" / f"d{d}.raw", "wb") as f:
                f.truncate(DISK_SIZE)
        wait_in_sync(mount, time.monotonic() + 60)

        seq = 1
        checked = []
        for round_ in range(6):
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt), str(log), str(seq)])
            time.sleep(rng.uniform(1.0, 2.5))
            crash_source = round_ % 3 == 2
            receiver.kill9()
            if crash_source:
                mount.kill()
            else:
                writer.kill()
            writer.wait(30)
            writes, _ = read_log(log)
            seq = max(w[0] for w in writes) + 1
            with open(log, "a") as f:  # the write in flight when it stopped may or may not be in
                f.write(f"failed {seq - 1}\n")

            # Recovery happens when the receiver starts; it listens on another
            # port meanwhile, so no new cycle lands while the replica is read.
            check = Server(f"dir:{store}", tmp_path / "check.log", port=free_port()).start()
            check.stop()
            checked.append(check_one_cut(store, log))

            receiver = Server(f"dir:{store}", tmp_path / "serve.log", port=port).start()
            if crash_source:
                mount = mount_factory(src, mnt, *args)
        assert checked[-1] > checked[0], f"replication made no progress: cuts at {checked}"

        wait_in_sync(mount, time.monotonic() + 60)
        for d in range(DISKS):
            assert (store / "site1" / "vm1" / f"d{d}.raw").read_bytes() == (src / "vm1" / f"d{d}.raw").read_bytes()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait(10)
        receiver.stop()
