"""Getting a VM back at the DR site, on real mounts and a real `vrfs serve`:
`vrfs points`, `vrfs test-failover` (qcow2 overlays and raw copies, with the
server running and without it), `vrfs failover` (fencing the source, handing
the images to a datastore that `vrfs mount` serves from that point), and the
operator's mistakes. Images are compared byte for byte with what the source
held at the point (`qemu-img compare` for the overlays)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mounthelpers import vrfs
from servehelpers import Server
from sitehelpers import BS, MiB, Site, run, sha

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs FUSE"),
]


def replicate_a_vm(site: Site) -> dict[str, str]:
    """vm1: a raw image and a qcow2 image written with qemu-io; returns their
    content hashes at the point the DR site then holds."""
    (site.mnt / "vm1").mkdir()
    with open(site.mnt / "vm1/disk0.raw", "wb") as f:
        f.truncate(16 * MiB)
        for k in range(0, 16 * MiB, 5 * BS):
            f.seek(k)
            f.write(os.urandom(BS))
    qcow = site.mnt / "vm1/disk1.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "64M")
    run("qemu-io", "-t", "none", "-f", "qcow2", "-c", "write -P 0x5a 0 2M", "-c", "write -P 0x11 40M 64k", str(qcow))
    site.wait_converged("vm1 replicated")
    return {p: sha(site.src / p) for p in ("vm1/disk0.raw", "vm1/disk1.qcow2")}


def points(site: Site, *args: str) -> list[dict]:
    return json.loads(vrfs("points", "--store", site.store_url, "--json", *args).stdout)


def test_points_and_test_failover_while_replication_goes_on(site: Site, tmp_path: Path) -> None:
    at_point = replicate_a_vm(site)
    (pt,) = points(site, "hv1/vm1")
    assert pt["id"] >= 1 and {d["path"] for d in pt["disks"]} == set(at_point)
    human = vrfs("points", "--store", site.store_url).stdout
    assert "hv1/vm1" in human and "vm1/disk1.qcow2" in human

    # qcow2 overlays on a read-only copy of the point, with the server running.
    test = tmp_path / "test1"
    out = vrfs("test-failover", "--store", site.store_url, "hv1/vm1", "--to", str(test)).stdout
    assert f"point {pt['id']}" in out and "--cleanup" in out, out
    for p in at_point:
        info = json.loads(run("qemu-img", "info", "--output=json", str(test / p)).stdout)
        assert info["format"] == "qcow2" and info["backing-filename"]
        assert sha(Path(info["backing-filename"])) == at_point[p]
        run("qemu-img", "compare", "-q", str(test / p), str(site.src / p))
    # The test VM writes; the source writes; neither sees the other.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 1M", str(test / "vm1/disk0.raw"))
    with open(site.mnt / "vm1/disk0.raw", "r+b") as f:
        f.write(b"after the test failover began")
    site.wait_in_sync("vm1/disk0.raw", after={"vm1/disk0.raw": pt["id"]})
    site.wait_converged("replication went on")
    base = Path(json.loads(run("qemu-img", "info", "--output=json", str(test / "vm1/disk0.raw")).stdout)
                ["backing-filename"])
    assert sha(base) == at_point["vm1/disk0.raw"]  # the point's copy did not move

    # Raw sparse copies, with no server running: the command holds the store itself.
    site.server.stop()
    test2 = tmp_path / "test2"
    vrfs("test-failover", "--store", site.store_url, "hv1/vm1", "--to", str(test2), "--format", "raw")
    for p in at_point:
        assert sha(test2 / p) == sha(site.src / p)
    site.server.start()

    for d in (test, test2):
        assert "removed the test failover" in vrfs("test-failover", "--cleanup", str(d)).stdout
        assert not d.exists()
    site.wait_converged("after the cleanups")


def test_failover_fences_the_source_and_hands_over_a_datastore(site: Site, tmp_path: Path, mount_factory) -> None:
    at_point = replicate_a_vm(site)
    (pt,) = points(site, "hv1/vm1")
    target = tmp_path / "dr-datastore"
    out = vrfs("failover", "--store", site.store_url, "hv1/vm1", "--to", str(target)).stdout
    assert "fenced" in out and "(rename)" in out and f"point {pt['id']}" in out, out
    for p, h in at_point.items():
        assert sha(target / p) == h
    status = {d["path"]: d for d in json.loads(vrfs("status", "--store", site.store_url, "--json").stdout)}
    assert all(d["point"]["id"] == pt["id"] and d["state"] == "failed-over" for d in status.values()), status

    # The old source keeps writing: refused, shown as fenced, asked again at most once a minute.
    with open(site.mnt / "vm1/disk0.raw", "r+b") as f:
        f.write(b"written after the failover")
    site.wait("fenced", lambda st: st["vm1/disk0.raw"]["state"] == "fenced", timeout=30)
    time.sleep(4)
    refusals = site.server.log().count("refused cycle")
    assert refusals == 1, site.server.log()[-2000:]
    for p, h in at_point.items():
        assert sha(target / p) == h, "the failed-over images changed"
    again = vrfs("failover", "--store", site.store_url, "hv1/vm1", "--to", str(tmp_path / "x"), check=False)
    assert again.returncode == 1 and "already failed over" in again.stderr

    # The images are a datastore, tracked from the point: no full sync needed.
    lineage = json.loads((target / ".vrfs/lineage.json").read_text())
    assert {v["point"] for v in lineage.values()} == {pt["id"]}
    site.mount.umount()
    m = mount_factory(target, None)
    disks = {d["path"]: d for d in m.status()}
    assert set(disks) == set(at_point)
    assert all(d["state"] == "tracking" and d["dirty_blocks"] == 0 for d in disks.values()), disks
    with open(target / "vm1/disk0.raw", "r+b") as f:  # the VM runs at the DR site
        f.seek(3 * BS)
        f.write(b"dr")
    assert m.dirty_blocks("vm1/disk0.raw") == {3}


def test_operator_mistakes_get_one_line(site: Site, tmp_path: Path) -> None:
    replicate_a_vm(site)
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    cases = [
        (["points", "--store", site.store_url, "hv1/vm9"], "no such group"),
        (["points", "--store", f"dir:{tmp_path / 'nowhere'}"], "not a vrfs store"),
        (["points", "--store", "ftp:x"], "bad store URL"),
        (["failover", "--store", site.store_url, "hv1/vm9", "--to", str(tmp_path / "a")], "no such group"),
        (["failover", "--store", site.store_url, "vm1", "--to", str(tmp_path / "a")], "SOURCE/GROUP"),
        (["failover", "--store", site.store_url, "hv1/vm1", "--to", str(full)], "not an empty directory"),
        (["failover", "--store", site.store_url, "hv1/vm1", "--point", "999", "--to", str(tmp_path / "a")],
         "no point 999"),
        (["test-failover", "--store", site.store_url, "hv1/vm1", "--to", str(full)], "not an empty directory"),
        (["test-failover", "--store", site.store_url, "hv1/vm1"], "needs --store URL, SOURCE/GROUP and --to"),
        (["test-failover", "--cleanup", str(full)], "is not a test failover"),
    ]
    for args, expect in cases:
        result = vrfs(*args, check=False)
        assert result.returncode != 0, args
        assert expect in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()
    site.wait_converged("nothing changed")


def test_test_failover_of_an_older_point_of_an_ext4_and_a_qcow2_disk(tmp_path, mount_factory, stack) -> None:
    """A VM of an ext4 file system (through a loop device) and a qcow2 image
    (qemu-io -t none): the images of an older, kept point are what the source
    held at that cut (copied then), and its file system checks clean."""
    from servehelpers import losetup, losetup_detach
    site = Site(tmp_path, mount_factory, stack)
    site.server.args = ("--retain", "1h:1s")
    site.serve().start_mount()
    (site.mnt / "vm1").mkdir()
    raw, qcow = site.mnt / "vm1/fs.raw", site.mnt / "vm1/data.qcow2"
    run("truncate", "-s", "64M", str(raw))
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "64M")
    fsmnt = tmp_path / "fs"
    fsmnt.mkdir()

    def use_fs(tag: str) -> None:
        loop = losetup(raw)
        try:
            if tag == "one":
                run("mkfs.ext4", "-q", "-F", loop)
            run("mount", loop, str(fsmnt))
            try:
                for i in range(20):
                    (fsmnt / f"{tag}-{i}").write_bytes(os.urandom(30_000 + i * 1000))
            finally:
                run("umount", str(fsmnt))
        finally:
            losetup_detach(loop)
        run("qemu-io", "-t", "none", "-f", "qcow2", "-c",
            f"write -P {0x20 + len(tag)} {len(tag)}M 512k", str(qcow))

    use_fs("one")
    site.wait_converged("first state")
    kept = tmp_path / "kept"
    kept.mkdir()
    for p in (raw, qcow):
        run("cp", "--sparse=always", str(site.src / "vm1" / p.name), str(kept / p.name))
    point = site.status()["vm1/fs.raw"]["last_point"]["id"]
    time.sleep(1.5)
    use_fs("three")  # the source moves on
    site.wait_converged("second state")
    assert site.status()["vm1/fs.raw"]["last_point"]["id"] > point

    to = tmp_path / "test"
    vrfs("test-failover", "--store", site.store_url, "hv1/vm1", "--point", str(point), "--to", str(to))
    for name in ("fs.raw", "data.qcow2"):
        run("qemu-img", "compare", "-q", str(to / "vm1" / name), str(kept / name))
    raw_to = tmp_path / "test-raw"
    vrfs("test-failover", "--store", site.store_url, "hv1/vm1", "--point", str(point), "--to", str(raw_to),
         "--format", "raw")
    run("e2fsck", "-fn", str(raw_to / "vm1/fs.raw"))
    assert sha(raw_to / "vm1/fs.raw") == sha(kept / "fs.raw")
    for d in (to, raw_to):
        vrfs("test-failover", "--cleanup", str(d))


async def test_a_source_whose_disk_history_diverged_is_refused(tmp_path) -> None:
    """Split brain: the store holds generation g1 of a disk (written by the
    site that took over after a failover); the old site's copy, still in g0,
    is refused as diverged, with one log line naming both, and nothing changes."""
    import dataclasses

    from servehelpers import aiter_blocks, connect, disk, header
    from vrfs.link import CycleRefused
    store = tmp_path / "store"
    server = Server(f"dir:{store}", tmp_path / "serve.log")
    try:
        server.start()
        link = await connect(server, "siteb")
        new = dataclasses.replace(disk(1, "vm1/a.raw", BS), history=("01" * 16, "g1"))
        await link.send_cycle(dataclasses.replace(header("vm1", 1, new), full_sync={new.disk_id: None}),
                              aiter_blocks([(0, 0, b"N" * BS)]))
        old = dataclasses.replace(new, history=("01" * 16,))
        with pytest.raises(CycleRefused, match="diverged") as refused:
            await link.send_cycle(header("vm1", 2, old), aiter_blocks([(0, 0, b"O" * BS)]))
        assert refused.value.diverged and refused.value.fenced
        assert (store / "siteb/vm1/a.raw").read_bytes() == b"N" * BS
        line = [x for x in server.log().splitlines() if "diverged" in x]
        assert len(line) == 1 and "g1" in line[0] and "0101" in line[0], line
        # Its own next generation is taken.
        newer = dataclasses.replace(new, history=("01" * 16, "g1", "g2"))
        await link.send_cycle(header("vm1", 2, newer), aiter_blocks([(0, 0, b"M" * BS)]))
        assert (store / "siteb/vm1/a.raw").read_bytes() == b"M" * BS
        await link.aclose()
    finally:
        server.stop()


def test_a_whole_site_fails_over_into_one_datastore(site: Site, tmp_path: Path, mount_factory) -> None:
    """Group after group into the same datastore, which `vrfs mount` then
    serves whole, every disk tracked from its own group's point; a group
    whose directory the datastore already holds is refused before its fence."""
    at_point = replicate_a_vm(site)
    for vm in ("vm2", "vm3"):
        (site.mnt / vm).mkdir()
        (site.mnt / vm / "disk.raw").write_bytes(os.urandom(3 * BS))
        at_point[f"{vm}/disk.raw"] = sha(site.mnt / vm / "disk.raw")
    site.wait_converged("three VMs replicated")
    target = tmp_path / "dr-datastore"
    for vm in ("vm1", "vm2"):
        out = vrfs("failover", "--store", site.store_url, f"hv1/{vm}", "--to", str(target)).stdout
        assert f"hv1/{vm} failed over at point" in out, out
    (target / "vm3").mkdir()  # something of the DR site's own, by that name
    refused = vrfs("failover", "--store", site.store_url, "hv1/vm3", "--to", str(target), check=False)
    assert refused.returncode == 1 and "already holds vm3" in refused.stderr, refused.stderr
    status = {d["path"]: d["state"] for d in json.loads(vrfs("status", "--store", site.store_url, "--json").stdout)}
    assert status["vm3/disk.raw"] == "ok", status  # not fenced: nothing was done to it
    (target / "vm3").rmdir()
    vrfs("failover", "--store", site.store_url, "hv1/vm3", "--to", str(target))
    for p, h in at_point.items():
        assert sha(target / p) == h, p
    lineage = json.loads((target / ".vrfs/lineage.json").read_text())
    assert {v["group"] for v in lineage.values()} == {"vm1", "vm2", "vm3"}
    site.mount.umount()
    m = mount_factory(target, None)
    disks = {d["path"]: d for d in m.status()}
    assert set(disks) == set(at_point)
    assert all(d["state"] == "tracking" and d["dirty_blocks"] == 0 for d in disks.values()), disks
