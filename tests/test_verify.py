"""`vrfs verify` on real mounts and a real `vrfs serve`: a clean replica
verifies clean, a block damaged by hand at the DR site is found (and with
--repair shipped again), a verify under fio finds no false difference, an
interrupted verify resumes, a verify without a link gives up with exit 2, and
the mount's periodic verify heals what it finds. Replicas are always compared
byte for byte as well."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mounthelpers import vrfs
from servehelpers import REPO, vrfs_command, vrfs_env
from sitehelpers import BS, MiB, NAME, Site, sha, tree

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs FUSE"),
]


def verify(site: Site, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return vrfs("verify", str(site.mnt), *args, check=False, timeout=timeout)


def populate(site: Site) -> None:
    for group, n in (("vm1", 2), ("vm2", 1)):
        (site.mnt / group).mkdir()
        for i in range(n):
            with open(site.mnt / group / f"d{i}.raw", "wb") as f:
                f.truncate(8 * MiB)
                for k in range(0, 8 * MiB, 3 * BS):  # data, holes and zero blocks
                    f.seek(k)
                    f.write(os.urandom(BS))
    site.wait_converged("after populating")


def damage(path: Path, block: int) -> None:
    with open(path, "r+b") as f:
        f.seek(block * BS + 100)
        f.write(b"bit rot at the DR site")


def test_clean_replicas_verify_clean(site: Site) -> None:
    populate(site)
    result = verify(site, "--rate", "0", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["result"] == "ok"
    assert {d["state"] for d in job["disks"].values()} == {"ok"}
    assert sum(d["compared"] for d in job["disks"].values()) == 3 * 8 * MiB // BS
    # One group only.
    result = verify(site, "vm2", "--rate", "0", "--json")
    assert result.returncode == 0 and set(json.loads(result.stdout)["disks"]) == {"vm2/d0.raw"}
    assert site.status()["vm1/d0.raw"]["verify"]["state"] == "ok"


def test_damaged_block_is_found_then_repaired(site: Site) -> None:
    populate(site)
    replica = site.replica("vm1/d1.raw")
    damage(replica, 6)     # a data block
    damage(replica, 100)   # a hole at the source
    damaged = replica.read_bytes()

    result = verify(site, "--rate", "0")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "vm1/d1.raw: differs" in result.stdout and "2 differ (blocks 6, 100)" in result.stdout, result.stdout
    assert "vm1/d0.raw: ok" in result.stdout and "vm2/d0.raw: ok" in result.stdout
    assert replica.read_bytes() == damaged  # reported only
    human = vrfs("status", str(site.mnt)).stdout
    assert "2 blocks differed" in human, human

    result = verify(site, "vm1", "--repair", "--rate", "0")
    assert result.returncode == 1 and "repaired at point" in result.stdout, (result.stdout, result.stderr)
    assert sha(replica) == sha(site.src / "vm1/d1.raw")
    assert tree(site.store / NAME) == tree(site.src)
    assert verify(site, "--rate", "0").returncode == 0


def test_missing_replica_is_reported_and_rebuilt(site: Site) -> None:
    populate(site)
    site.replica("vm2/d0.raw").unlink()
    result = verify(site, "vm2", "--rate", "0", "--repair")
    assert result.returncode == 1 and "vm2/d0.raw: missing" in result.stdout, (result.stdout, result.stderr)
    site.wait_converged("after the rebuild")


def test_verify_while_fio_writes_finds_no_false_difference(site: Site) -> None:
    populate(site)
    disk = site.mnt / "vm1/busy.raw"
    with open(disk, "wb") as f:
        f.write(os.urandom(32 * MiB))
    site.wait_converged("after writing the busy disk")
    # fio rewrites the first 8 MiB all along; the rest stays as it was.
    fio = subprocess.Popen(["fio", "--name=w", f"--filename={disk}", "--rw=randwrite", "--bs=4k",
                            "--ioengine=libaio", "--iodepth=8", "--direct=1", "--time_based", "--runtime=10",
                            "--size=8M", "--randrepeat=0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        result = verify(site, "--rate", "16M", "--json")  # about 3 s: fio writes all along
        assert fio.poll() is None, "fio ended before the verify did"
        assert result.returncode == 0, (result.stdout, result.stderr)
        busy = json.loads(result.stdout)["disks"]["vm1/busy.raw"]
        assert busy["compared"] >= 24 * MiB // BS and busy["skipped"] > 0, busy
    finally:
        if fio.poll() is None:
            fio.send_signal(signal.SIGTERM)
        fio.wait(30)
    site.wait_converged("after fio")


def test_interrupted_verify_resumes(site: Site) -> None:
    (site.mnt / "vm1").mkdir()
    with open(site.mnt / "vm1/big.raw", "wb") as f:
        for _ in range(8):
            f.write(os.urandom(8 * MiB))
    site.wait_converged("after writing 64 MiB")
    proc = subprocess.Popen(vrfs_command("verify", str(site.mnt), "--rate", "16M"), env=vrfs_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130 and "paused" in err, (proc.returncode, out, err)
    result = verify(site, "--rate", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert "resumed at" in site.mount.log()
    resumed = [line for line in site.mount.log().splitlines() if "resumed at" in line][-1]
    assert not resumed.endswith(" 0%"), resumed


def test_verify_without_a_link_gives_up_with_2(site: Site) -> None:
    populate(site)
    site.server.stop()
    result = verify(site, "--wait", "3s", timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "no progress" in result.stderr and "resumes" in result.stderr


def test_verify_refuses_unknown_groups_and_plain_mounts(site: Site, tmp_path, mount_factory) -> None:
    populate(site)
    result = verify(site, "vm9")
    assert result.returncode == 2 and "no such group" in result.stderr, result.stderr
    src, mnt = tmp_path / "plain-src", tmp_path / "plain-mnt"
    src.mkdir()
    mnt.mkdir()
    mount_factory(src, mnt)
    result = vrfs("verify", str(mnt), check=False)
    assert result.returncode == 2 and "nothing to verify" in result.stderr, result.stderr
    result = vrfs("verify", str(tmp_path), check=False)
    assert result.returncode != 0 and "not a vrfs mount" in result.stderr, result.stderr


def test_periodic_verify_heals_the_replica(tmp_path, mount_factory, stack) -> None:
    site = Site(tmp_path, mount_factory, stack).serve()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--rpo", "2s", "--verify-every", "3s")
    populate(site)
    damage(site.replica("vm2/d0.raw"), 3)
    deadline = time.monotonic() + 60
    while sha(site.replica("vm2/d0.raw")) != sha(site.src / "vm2/d0.raw"):
        assert time.monotonic() < deadline, site.mount.log()[-3000:]
        time.sleep(0.5)
    site.wait_converged("after the periodic verify")
    assert "differ at the DR site" in site.mount.log()
