"""A replica is never silently wrong: regressions on real mounts and a real
`vrfs serve`, each compared byte for byte at both sites.

- a lost, truncated or garbage state file, or an image replaced while the
  datastore was unmounted: the full sync compares with the old replica and
  builds on it (it used to delete it and leave zeros, reported in sync);
- a disk moved over another one through the mount, across groups;
- a replica deleted or cut short at the DR site: found and rebuilt;
- a store that fills up during apply: `status --store` says the replica is
  incomplete, never the old point, and the group converges once there is room;
- a committed cycle that can never be applied (a disk too large for the
  store's file system): reported for its group, other groups go on, and it is
  dropped once the disk is deleted at the source.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from mounthelpers import vrfs
from sitehelpers import BS, MiB, Site, sha

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs FUSE"),
]


def store_status(site: Site) -> dict[str, dict]:
    return {d["path"]: d for d in json.loads(vrfs("status", "--store", site.store_url, "--json").stdout)}


def small_ext4(tmp_path: Path, stack: ExitStack, size_mib: int, *, small_files: bool = False) -> Path:
    """A small ext4 file system loop-mounted under tmp_path; unmounted (lazily
    if it must be) at teardown. With small_files, 1 KiB blocks and no extents:
    no file can be larger than about 16 GiB."""
    image, where = tmp_path / "storefs.img", tmp_path / "storefs"
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    features = ["-b", "1024", "-O", "^extent,^huge_file,^64bit"] if small_files else []
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", *features, str(image)], check=True, capture_output=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True, capture_output=True)

    def unmount() -> None:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
    stack.callback(unmount)
    return where


def write_random(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


# ------------------------------------------------------- lost tracking state

@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "image-replaced"])
def test_lost_tracking_state_keeps_the_replica(site: Site, damage: str) -> None:
    (site.mnt / "vm1").mkdir()
    data = write_random(site.mnt / "vm1/disk.raw", 8 * MiB, 1)
    st = site.wait_in_sync("vm1/disk.raw")["vm1/disk.raw"]
    site.mount.umount()

    state_files = list((site.src / ".vrfs/state").glob("*.psf"))
    assert state_files
    changed = bytearray(data)
    if damage == "deleted":
        for f in state_files:
            f.unlink()
    elif damage == "truncated":
        for f in state_files:
            os.truncate(f, 20)
    elif damage == "garbage":
        for f in state_files:
            f.write_bytes(os.urandom(f.stat().st_size))
    else:  # a new inode with one block changed, moved over the image
        changed[3 * BS:4 * BS] = os.urandom(BS)
        (site.src / "vm1/disk.new").write_bytes(changed)
        os.replace(site.src / "vm1/disk.new", site.src / "vm1/disk.raw")

    site.start_mount()
    after = {"vm1/disk.raw": st["last_point"]["id"]}
    st2 = site.wait_in_sync("vm1/disk.raw", after=after)["vm1/disk.raw"]
    assert sha(site.replica("vm1/disk.raw")) == sha(site.src / "vm1/disk.raw")
    assert (site.src / "vm1/disk.raw").read_bytes() == bytes(changed)
    # Built on the old replica: only the differing block travelled.
    assert st2["bytes_sent"] <= 2 * BS, st2
    assert "full sync" in site.mount.log()


# --------------------------------------------------- a disk moved over another

def test_disk_moved_over_another_across_groups(site: Site) -> None:
    m = site.mnt
    (m / "vm1").mkdir()
    (m / "vm2").mkdir()
    data = write_random(m / "vm1/disk.raw", 8 * MiB, 2)
    clone = bytearray(data)
    clone[5 * BS:6 * BS] = os.urandom(BS)
    (m / "vm2/disk.raw").write_bytes(clone)
    site.wait_in_sync("vm1/disk.raw", "vm2/disk.raw")

    os.rename(m / "vm2/disk.raw", m / "vm1/disk.raw")  # the clone replaces vm1's disk
    site.wait_converged("after mv vm2/disk.raw vm1/disk.raw")
    assert sha(site.replica("vm1/disk.raw")) == sha(site.src / "vm1/disk.raw")
    assert not site.replica("vm2/disk.raw").exists()


def test_disk_replaced_in_its_group_while_the_old_one_moves_aside(site: Site) -> None:
    m = site.mnt
    (m / "vm1").mkdir()
    data = write_random(m / "vm1/disk.raw", 4 * MiB, 3)
    site.wait_in_sync("vm1/disk.raw")
    # Keep the old disk under another name and put a new one, that shares
    # most of its content, in its place: the new one is compared with the old
    # replica, which must survive under its new name too.
    os.rename(m / "vm1/disk.raw", m / "vm1/old.raw")
    new = bytearray(data)
    new[0:BS] = os.urandom(BS)
    (m / "vm1/disk.raw").write_bytes(new)
    site.wait_converged("after the old disk moved aside")


# --------------------------------------------------------- DR-side damage

@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_replica_damaged_at_the_dr_site_is_found_and_rebuilt(site: Site, damage: str) -> None:
    (site.mnt / "vm1").mkdir()
    (site.mnt / "vm2").mkdir()
    write_random(site.mnt / "vm1/a.raw", 4 * MiB, 4)
    write_random(site.mnt / "vm2/b.raw", 4 * MiB, 5)
    st = site.wait_in_sync("vm1/a.raw", "vm2/b.raw")
    before = {p: d["last_point"]["id"] for p, d in st.items()}

    if damage == "deleted":
        site.replica("vm1/a.raw").unlink()
    else:
        os.truncate(site.replica("vm1/a.raw"), MiB)
    # The DR site's own view says so at once.
    assert store_status(site)["vm1/a.raw"]["state"] == "damaged"
    assert store_status(site)["vm2/b.raw"]["state"] == "ok"

    # The group's next cycle finds it, and a full comparison rebuilds it.
    with open(site.mnt / "vm1/a.raw", "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"after the damage")
    site.wait_in_sync("vm1/a.raw", after=before)
    site.wait_converged("after DR-side damage and a write")
    assert store_status(site)["vm1/a.raw"]["state"] == "ok"
    assert "full sync" in site.mount.log()


def test_replica_deleted_at_the_dr_site_is_found_at_the_next_connection(site: Site) -> None:
    (site.mnt / "vm1").mkdir()
    write_random(site.mnt / "vm1/a.raw", 4 * MiB, 6)
    site.wait_in_sync("vm1/a.raw")
    site.server.stop()
    site.replica("vm1/a.raw").unlink()
    site.server.start()  # no write at the source: the handshake finds it
    site.wait_converged("after the receiver restarted")


# ------------------------------------------------------ a store that fills up

def test_store_full_during_apply_is_reported_and_recovers(tmp_path, mount_factory, stack) -> None:
    fs = small_ext4(tmp_path, stack, 48)
    site = Site(tmp_path, mount_factory, stack, store=fs / "store")
    site.serve().start_mount()
    (site.mnt / "vm1").mkdir()
    write_random(site.mnt / "vm1/a.raw", 4 * MiB, 7)
    # b.raw exists at the DR site before it grows: its blocks are journaled
    # and then applied (a disk new to the store would be staged whole, written once).
    write_random(site.mnt / "vm1/b.raw", 64 << 10, 6)
    site.wait_in_sync("vm1/a.raw", "vm1/b.raw")

    # Leave room for staging a 12 MiB cycle, not for staging and applying it.
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        left = free - 18 * MiB
        while left > 0:
            n = min(left, 4 * MiB)
            f.write(b"\x01" * n)
            left -= n
        f.flush()
        os.fsync(f.fileno())
    write_random(site.mnt / "vm1/b.raw", 12 * MiB, 8)

    deadline = time.monotonic() + 40
    while "cannot be applied" not in site.server.log():
        assert time.monotonic() < deadline, site.server.log()[-3000:]
        time.sleep(0.2)
    status = store_status(site)
    assert status["vm1/a.raw"]["state"] == "incomplete", status
    assert "No space left" in status["vm1/a.raw"]["error"], status
    human = vrfs("status", "--store", site.store_url).stdout
    assert "incomplete" in human and "No space left" in human
    # The source does not call the group in sync either.
    assert site.status()["vm1/b.raw"]["state"] != "in-sync"

    filler.unlink()
    site.wait_converged("after room was made in the store", timeout=60)
    assert {d["state"] for d in store_status(site).values()} == {"ok"}


# ------------------------------------------------- a journal that cannot apply

def test_unappliable_cycle_is_reported_for_its_group_and_dropped_with_its_disk(
        tmp_path, mount_factory, stack) -> None:
    fs = small_ext4(tmp_path, stack, 64, small_files=True)
    site = Site(tmp_path, mount_factory, stack, store=fs / "store")
    site.serve().start_mount()
    m = site.mnt
    (m / "vm1").mkdir()
    (m / "vm2").mkdir()
    write_random(m / "vm1/a.raw", MiB, 9)
    write_random(m / "vm2/b.raw", MiB, 10)
    # huge.raw is at the DR site before it grows: a disk new to the store
    # would be staged whole, and too large a one refused before its commit.
    write_random(m / "vm1/huge.raw", MiB, 11)
    st = site.wait_in_sync("vm1/a.raw", "vm2/b.raw", "vm1/huge.raw")

    # Legal at the source, too large for the store's file system: EFBIG at apply.
    with open(m / "vm1/huge.raw", "r+b") as f:
        f.truncate(32 << 30)
        f.seek(20 << 30)
        f.write(b"far away")
    deadline = time.monotonic() + 40
    while "cannot be applied" not in site.server.log():
        assert time.monotonic() < deadline, site.server.log()[-3000:]
        time.sleep(0.2)
    status = store_status(site)
    assert status["vm1/a.raw"]["state"] == "incomplete" and "too large" in status["vm1/a.raw"]["error"], status
    src = site.status()
    assert src["vm1/huge.raw"]["state"] != "in-sync"

    # Other groups go on meanwhile.
    with open(m / "vm2/b.raw", "r+b") as f:
        f.write(b"vm2 still replicates")
    site.wait_in_sync("vm2/b.raw", after={"vm2/b.raw": st["vm2/b.raw"]["last_point"]["id"]})
    assert sha(site.replica("vm2/b.raw")) == sha(site.src / "vm2/b.raw")

    # Deleted at the source: the poisoned cycle goes in without it, and vm1 converges.
    os.unlink(m / "vm1/huge.raw")
    with open(m / "vm1/a.raw", "r+b") as f:
        f.write(b"and vm1 again")
    site.wait_converged("after the huge disk was deleted", timeout=60)
    assert {d["state"] for d in store_status(site).values()} == {"ok"}
    assert not list((fs / "store/.vrfs/journal").rglob("commit.json"))



def test_disks_deleted_while_unmounted_leave_the_dr_site_too(site: Site) -> None:
    """Nothing tracks a deletion made while the datastore is not mounted: every
    group ships its namespace at the next connection, even one left empty."""
    for group in ("vm1", "vm2"):
        (site.mnt / group).mkdir()
        write_random(site.mnt / group / "a.raw", MiB, 12)
    write_random(site.mnt / "vm1/b.raw", MiB, 13)
    site.wait_converged("before")
    site.mount.umount()
    os.unlink(site.src / "vm1/b.raw")
    os.unlink(site.src / "vm2/a.raw")
    site.start_mount()
    deadline = time.monotonic() + 40
    while site.replica("vm2/a.raw").exists() or site.replica("vm1/b.raw").exists():
        assert time.monotonic() < deadline, site.mount.log()[-2000:]
        time.sleep(0.2)
    site.wait_converged("after deletions made while unmounted")


def _exchange(a: Path, b: Path) -> None:
    from vrfs import fs
    fs.renameat2(-100, str(a), str(b), fs.RENAME_EXCHANGE)  # absolute paths: the dir fd is not used


def test_rename_exchange_of_groups_and_of_disks_converges(site: Site) -> None:
    m = site.mnt
    for group in ("vm1", "vm2", "vm3"):
        (m / group).mkdir()
        write_random(m / group / "a.raw", MiB, hash(group) & 0xFFFF)
    write_random(m / "vm1/b.raw", MiB, 99)
    site.wait_converged("before")
    _exchange(m / "vm1", m / "vm2")              # two VMs' directories swap
    _exchange(m / "vm1/a.raw", m / "vm3/a.raw")  # two disks of different VMs swap
    _exchange(m / "vm2/a.raw", m / "vm2/b.raw")  # two disks of one VM swap
    site.wait_converged("after the exchanges")
    with open(m / "vm3/a.raw", "r+b") as f:      # and every group goes on replicating
        f.write(b"vm3 still replicates")
    site.wait_converged("after a write")
