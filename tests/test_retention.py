"""Points in time kept by a retention policy (`vrfs serve --retain`): the
policy as a pure function, and on a real mount and `vrfs serve`: every kept
point's images are byte for byte what the source held at its cut (recorded
at the cut), through writes, a shrink and a deleted disk; the kept set is
exactly the policy's, across restarts and a kill -9 in the middle of
pruning."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from mounthelpers import vrfs
from sitehelpers import BS, MiB, NAME, Site, sha, sparse_sha
from vrfs.errors import UserError
from vrfs.retention import parse_policy, retained

SLOT = 8
POLICY = f"1h:{SLOT}s"  # one point per 8-second slot of the clock, for an hour: every point of a test


def expected_kept(cuts: dict[int, float], policy: str) -> set[int]:
    """What the policy keeps, as of the newest point (spans far longer than a test)."""
    return retained(list(cuts.items()), parse_policy(policy), max(cuts.values()))


def test_policy_keeps_the_newest_per_slot_and_always_the_newest() -> None:
    points = [(i, 1000.0 + 10 * i) for i in range(1, 40)]  # one point every 10 s
    policy = parse_policy("1m:20s,5m:1m")
    now = points[-1][1]
    kept = retained(points, policy, now)
    assert 39 in kept
    for span, every in policy:
        slots = {}
        for pid, cut in points:
            if now - cut <= span:
                slots.setdefault(int(cut // every), []).append(pid)
        assert {max(ids) for ids in slots.values()} <= kept
    assert len(kept) <= 1 + 60 // 20 + 1 + 300 // 60 + 1
    assert retained(points, (), now) == {39}
    assert retained([], policy, now) == set()


@pytest.mark.parametrize("bad", ["1h", "5m:1h", "x:1m", "1h:5m,", "1h:0s"])
def test_bad_policies_are_refused(bad: str) -> None:
    with pytest.raises(UserError):
        parse_policy(bad)


@pytest.fixture
def retaining_site(tmp_path, mount_factory, stack) -> Site:
    site = Site(tmp_path, mount_factory, stack)
    site.server.args = ("--retain", POLICY)
    return site.serve().start_mount()


def snapshot(site: Site) -> dict[str, str]:
    return {str(p.relative_to(site.src)): sha(p) for p in sorted(site.src.rglob("*"))
            if p.is_file() and p.relative_to(site.src).parts[0] != ".vrfs"}


def points(site: Site) -> list[dict]:
    return json.loads(vrfs("points", "--store", site.store_url, "--json").stdout)


def image_hashes(site: Site, point: int, tmp_path: Path) -> dict[str, str]:
    to = tmp_path / f"test-{point}-{time.monotonic_ns()}"
    vrfs("test-failover", "--store", site.store_url, f"{NAME}/vm1", "--point", str(point), "--to", str(to),
         "--format", "raw")
    out = {str(p.relative_to(to)): sha(p) for p in sorted(to.rglob("*"))
           if p.is_file() and not p.name.startswith(".vrfs")}
    vrfs("test-failover", "--cleanup", str(to))
    return out


@pytest.mark.timeout(240)
def test_kept_points_hold_exactly_what_the_source_held(retaining_site: Site, tmp_path: Path) -> None:
    site = retaining_site
    rng = random.Random(11)
    (site.mnt / "vm1").mkdir()
    with open(site.mnt / "vm1/a.raw", "wb") as f:
        f.write(rng.randbytes(4 * MiB))
    with open(site.mnt / "vm1/b.raw", "wb") as f:
        f.write(rng.randbytes(2 * MiB))
    recorded: dict[int, dict[str, str]] = {}
    recorded_cuts: dict[int, float] = {}
    last = 0
    for step in range(9):
        if step == 4:
            os.truncate(site.mnt / "vm1/a.raw", 3 * MiB + 100)  # a shrink
        elif step == 6:
            os.unlink(site.mnt / "vm1/b.raw")  # a deleted disk
        else:
            with open(site.mnt / "vm1/a.raw", "r+b") as f:
                for _ in range(5):
                    f.seek(rng.randrange(0, 3 * MiB))
                    f.write(rng.randbytes(rng.randrange(1, 2 * BS)))
        site.wait_converged(f"step {step}")
        point = site.status()["vm1/a.raw"]["last_point"]
        assert point["id"] > last
        recorded[point["id"]], last = snapshot(site), point["id"]
        recorded_cuts[point["id"]] = point["cut_time"]
        time.sleep(1.2)

    listed = points(site)
    kept = {p["id"] for p in listed}
    cuts = {p["id"]: p["cut_time"] for p in listed}
    assert kept == expected_kept(cuts, POLICY), (kept, cuts)  # nothing more than the policy asks
    for slot in {int(c // SLOT) for c in recorded_cuts.values()}:  # and nothing less
        newest_recorded = max(i for i, c in recorded_cuts.items() if int(c // SLOT) == slot)
        in_slot = [i for i, c in cuts.items() if int(c // SLOT) == slot]
        assert len(in_slot) == 1 and in_slot[0] >= newest_recorded, (slot, in_slot, recorded_cuts, cuts)
    assert 1 < len(kept) < len(recorded)
    # What changed after each point, not copies of its disks (6 MiB at the start).
    assert sum(p["bytes_kept"] for p in listed) < (len(kept) - 1) * 3 * MiB, listed
    for point in sorted(kept):
        if point in recorded:
            assert image_hashes(site, point, tmp_path) == recorded[point], point

    # Across a restart, and a kill -9 in the middle of pruning: no kept point is lost.
    site.server.stop()
    site.server.start()
    assert {p["id"] for p in points(site)} == kept
    site.server.stop()
    site.server.env = {"VRFS_TEST_CRASH": "pruning"}
    site.server.start()
    with open(site.mnt / "vm1/a.raw", "r+b") as f:
        f.write(b"one more point")
    deadline = time.monotonic() + 40
    while site.server.proc.poll() is None:
        assert time.monotonic() < deadline, "the server was not killed while pruning"
        with open(site.mnt / "vm1/a.raw", "r+b") as f:
            f.seek(BS)
            f.write(os.urandom(100))
        time.sleep(1.5)
    site.server.env = {}
    site.server.start()
    site.wait_converged("after the crash while pruning")
    recorded[site.status()["vm1/a.raw"]["last_point"]["id"]] = snapshot(site)
    listed = points(site)
    kept = {p["id"] for p in listed}
    assert kept == expected_kept({p["id"]: p["cut_time"] for p in listed}, POLICY)
    for point in sorted(kept):
        if point in recorded:
            assert image_hashes(site, point, tmp_path) == recorded[point], point


def test_a_policy_that_does_not_parse_is_refused(tmp_path) -> None:
    result = vrfs("serve", "--store", f"dir:{tmp_path / 's'}", "--retain", "1h", check=False)
    assert result.returncode == 2 and "SPAN:EVERY" in result.stderr


@pytest.mark.timeout(240)
def test_test_failover_of_an_older_point_costs_what_changed_not_the_disk(retaining_site: Site, tmp_path) -> None:
    """A 1 GiB sparse disk, 1 % of it changed since the point: the images of
    that point are made in a fraction of the time a copy of the disk takes."""
    site = retaining_site
    size, rng = 1 << 30, random.Random(3)
    (site.mnt / "vm1").mkdir()
    with open(site.mnt / "vm1/big.raw", "wb") as f:
        f.truncate(size)
        for k in range(0, size, 16 * MiB):  # some data everywhere, mostly holes
            f.seek(k)
            f.write(rng.randbytes(BS))
    point = site.wait_in_sync("vm1/big.raw", timeout=120)["vm1/big.raw"]["last_point"]["id"]
    at_point = sparse_sha(site.src / "vm1/big.raw")
    time.sleep(SLOT + 1)  # the next point falls in another slot: this one is kept
    changed = rng.sample(range(size // BS), size // BS // 100)
    with open(site.mnt / "vm1/big.raw", "r+b") as f:
        for b in sorted(changed):
            f.seek(b * BS)
            f.write(rng.randbytes(BS))
    site.wait_in_sync("vm1/big.raw", after={"vm1/big.raw": point}, timeout=120)
    assert point in {p["id"] for p in points(site)}

    started = time.monotonic()
    to = tmp_path / "test"
    vrfs("test-failover", "--store", site.store_url, f"{NAME}/vm1", "--point", str(point), "--to", str(to),
         timeout=120)
    took = time.monotonic() - started
    base = Path(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(to / "vm1/big.raw")],
                                          capture_output=True, text=True, check=True).stdout)["backing-filename"])
    assert sparse_sha(base) == at_point
    started = time.monotonic()
    with open(site.replica("vm1/big.raw"), "rb") as src, open(tmp_path / "full-copy", "wb") as dst:
        while chunk := src.read(16 * MiB):
            dst.write(chunk)
        os.fsync(dst.fileno())
    copy_took = time.monotonic() - started
    os.unlink(tmp_path / "full-copy")
    print(f"test failover of the older point: {took:.2f} s; a copy of the disk: {copy_took:.2f} s")
    assert took < 0.5 * copy_took, (took, copy_took)
    vrfs("test-failover", "--cleanup", str(to))


@pytest.mark.timeout(120)
def test_a_replica_deleted_by_hand_loses_its_older_points_loudly_and_wedges_nothing(retaining_site: Site,
                                                                                   tmp_path) -> None:
    """A replica deleted at the DR site by hand takes with it what older
    points were built on: the disk is rebuilt by a full sync and replication
    goes on (it once stayed refused: the cycle's capture read the missing
    replica), and a test failover of an older point says in one line that
    this disk cannot be rebuilt, instead of giving other bytes."""
    site = retaining_site
    (site.mnt / "vm1").mkdir()
    for name in ("a.raw", "b.raw"):
        (site.mnt / "vm1" / name).write_bytes(random.Random(name).randbytes(3 * BS))
    site.wait_converged("first point")
    older = site.status()["vm1/a.raw"]["last_point"]["id"]
    time.sleep(SLOT + 1)  # the next point falls in another slot: this one is kept
    site.replica("vm1/a.raw").unlink()
    site.server.stop()
    site.server.start()  # the source learns of the loss at its handshake
    with open(site.mnt / "vm1/b.raw", "r+b") as f:
        f.write(b"new" * 100)
    site.wait_converged("after the replica was deleted")
    assert older in {p["id"] for p in points(site)}
    result = vrfs("test-failover", "--store", site.store_url, f"{NAME}/vm1", "--point", str(older),
                  "--to", str(tmp_path / "t"), check=False)
    assert result.returncode == 1 and "vm1/a.raw cannot be rebuilt as of point" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "t").exists()
    newest = site.status()["vm1/a.raw"]["last_point"]["id"]
    assert image_hashes(site, newest, tmp_path) == snapshot(site)
