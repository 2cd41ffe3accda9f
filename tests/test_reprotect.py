"""The round trip, on real mounts and real `vrfs serve` processes: replicate
from site A to site B; A dies (kill -9) with changes B never got; fail over at
B and write there; reprotect at A and replicate back, moving only the blocks
changed on either side (asserted on the wire); fail back (planned); and
replicate forward again. Every step is compared byte for byte."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from mounthelpers import vrfs
from servehelpers import Server, free_port
from sitehelpers import BS, MiB, NAME, Site, tree

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs FUSE"),
]

SIZE = 32 * MiB


def write_blocks(path: Path, blocks: set[int], rng: random.Random) -> None:
    with open(path, "r+b") as f:
        for b in sorted(blocks):
            f.seek(b * BS)
            f.write(rng.randbytes(BS))
        f.flush()
        os.fsync(f.fileno())


def sent(mount, path: str) -> int:
    return mount.disk(path)["bytes_sent"]


def test_failover_reprotect_failback_round_trip(tmp_path, mount_factory, stack) -> None:
    rng = random.Random(5)
    a = Site(tmp_path, mount_factory, stack).serve().start_mount()  # A replicates to B
    (a.mnt / "vm1").mkdir()
    for name in ("d0.raw", "d1.raw"):
        with open(a.mnt / "vm1" / name, "wb") as f:
            f.write(rng.randbytes(SIZE))
    a.wait_converged("A replicated to B")

    # A goes on writing while B cannot hear it, then dies.
    a.server.stop()
    lost_at_a = {"vm1/d0.raw": set(rng.sample(range(SIZE // BS), 6)), "vm1/d1.raw": set()}
    write_blocks(a.mnt / "vm1/d0.raw", lost_at_a["vm1/d0.raw"], rng)
    a.mount.kill()

    # Unplanned failover at B (no server running: the command holds the store).
    b_dir = tmp_path / "b-datastore"
    out = vrfs("failover", "--store", a.store_url, f"{NAME}/vm1", "--to", str(b_dir)).stdout
    assert "fenced" in out
    b_mnt = tmp_path / "b-mnt"
    b_mnt.mkdir()
    b = mount_factory(b_dir, b_mnt)
    written_at_b = {"vm1/d0.raw": set(rng.sample(range(SIZE // BS), 5)), "vm1/d1.raw": {0, 7}}
    for p, blocks in written_at_b.items():
        write_blocks(b_mnt / p, blocks, rng)
    b.umount()

    # Reprotect at A: its old images become the seeds of the reverse direction.
    a_store = tmp_path / "a-store"
    out = vrfs("reprotect", "--datastore", str(a.src), "--store", f"dir:{a_store}").stdout
    assert "at point" in out and "blocks changed after it" in out, out
    assert not (a.src / "vm1/d0.raw").exists()
    back = Server(f"dir:{a_store}", tmp_path / "a-serve.log", port=free_port())
    stack.callback(back.stop)
    back.start()
    b = mount_factory(b_dir, b_mnt, "--peer", f"127.0.0.1:{back.port}", "--name", "siteb", "--rpo", "2s")
    wait_converged(b, b_dir, a_store / "siteb")
    for p in written_at_b:
        differing = len(written_at_b[p] | lost_at_a[p]) * BS
        assert sent(b, p) <= 1.5 * differing + 4096, (p, sent(b, p), differing)
    assert "full sync from point" in b.log() and "comparing" not in b.log()

    # Failback, planned: B's VM stops, its last cycle is acknowledged; fail over at A.
    write_blocks(b_mnt / "vm1/d1.raw", {3}, rng)
    wait_converged(b, b_dir, a_store / "siteb")
    b.umount()
    # A's `vrfs serve` still runs on that store: the failover is done by it, through its control socket.
    vrfs("failover", "--store", f"dir:{a_store}", "siteb/vm1", "--to", str(a.src))
    assert f"failover of siteb/vm1 to {a.src}: done" in back.log(), back.log()[-2000:]
    back.stop()
    out = vrfs("reprotect", "--datastore", str(b_dir), "--store", a.store_url).stdout
    assert "fence is lifted" in out, out
    a.server.start()
    a.start_mount()
    a.wait_converged("forward again after the failback")
    assert all(sent(a.mount, p) <= 4096 for p in written_at_b), a.status()
    # And it goes on replicating.
    write_blocks(a.mnt / "vm1/d0.raw", {1, 2}, rng)
    a.wait_converged("forward replication after the round trip")


def wait_converged(mount, source: Path, replicas: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = {d["path"]: d for d in mount.status()}
        if all(d["state"] == "in-sync" and not d["dirty_blocks"] for d in st.values()) \
                and tree(replicas) == tree(source):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not converged: {json.dumps(st, indent=1)}\n{mount.log()[-3000:]}")
        time.sleep(0.2)


def test_reprotect_refuses_a_served_or_foreign_directory(site: Site, tmp_path) -> None:
    result = vrfs("reprotect", "--datastore", str(site.src), "--store", f"dir:{tmp_path / 's'}", check=False)
    assert result.returncode == 1 and "served by vrfs mount" in result.stderr, result.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    result = vrfs("reprotect", "--datastore", str(plain), "--store", f"dir:{tmp_path / 's'}", check=False)
    assert result.returncode == 1 and "not a vrfs datastore" in result.stderr, result.stderr
