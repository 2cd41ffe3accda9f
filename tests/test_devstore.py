"""The dev: store on loop devices, driven through a real `vrfs serve`."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from vrfs.cycle import CycleHeader
from vrfs.link import CycleRefused, LinkError
from vrfs.store import store_status
from vrfs.store.base import StoreError
from vrfs.store.devstore import parse_map

from mounthelpers import vrfs
from servehelpers import Model, Server, aiter_blocks, connect, disk, header, losetup, losetup_detach

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("losetup") is None or not Path("/dev/loop-control").exists(),
                       reason="needs loop devices"),
]
BS = 65536
DEV_SIZE = 2 << 20


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[str]]:
    devices: list[str] = []
    try:
        for i in range(3):
            backing = tmp_path / f"backing{i}"
            with open(backing, "wb") as f:
                f.truncate(DEV_SIZE)
            devices.append(losetup(backing))
        yield devices
    finally:
        for dev in devices:
            losetup_detach(dev)


def device_bytes(dev: str, n: int) -> bytes:
    with open(dev, "rb") as f:
        return f.read(n)


def test_map_file_format() -> None:
    text = "# comment\n\nhv1/vm1/a.raw  /dev/loop7   # trailing\nhv2/x /dev/sdb\n"
    assert parse_map(text, "m") == {("hv1", "vm1/a.raw"): Path("/dev/loop7"), ("hv2", "x"): Path("/dev/sdb")}
    for bad, why in [("hv1/../x /dev/a", "'..'"), ("hv1/x dev/a", "absolute"), ("hv1/x", "expected"),
                     ("hv1/x /dev/a\nhv1/y /dev/a", "twice"), ("/x /dev/a", "source")]:
        with pytest.raises(StoreError, match=why):
            parse_map(bad, "m")


async def test_dev_store_converges(tmp_path: Path, loops: list[str]) -> None:
    mapfile = tmp_path / "devices.map"
    mapfile.write_text(f"# disks of hv1\nhv1/vm1/a.raw {loops[0]}\nhv1/vm1/b.raw {loops[1]}\n"
                       f"hv1/vm1/c.raw {loops[2]}\n")
    with open(loops[2], "r+b") as f:  # garbage on a device that a renamed disk will land on
        f.write(b"\xee" * (4 * BS))
    server = Server(f"dev:{mapfile}", tmp_path / "serve.log", env={"VRFS_TEST_CRASH": "committed"})
    model = Model()
    a = disk(1, "vm1/a.raw", 3 * BS + 100)
    b = disk(2, "vm1/b.raw", BS)
    try:
        server.start()
        link = await connect(server)
        writes = [(0, 0, b"A" * BS), (0, 3, b"T" * 100), (1, 0, b"B" * BS)]
        for d in (a, b):
            model.resize(d.path, d.size)
        model.write(a.path, 0, b"A" * BS)
        model.write(a.path, 3 * BS, b"T" * 100)
        model.write(b.path, 0, b"B" * BS)
        # Killed between commit and apply, then restarted: the redo brings the devices to the point.
        with pytest.raises(LinkError):
            await link.send_cycle(header("vm1", 1, a, b), aiter_blocks(writes))
        assert server.wait() == -9
        server.env = {}
        server.start()
        assert device_bytes(loops[0], a.size) == bytes(model.files[a.path])
        assert device_bytes(loops[1], b.size) == bytes(model.files[b.path])

        link = await connect(server)
        assert link.points == {"vm1": 1}
        # Grow a (the new tail reads as zeros), zero a block, keep b.
        a = disk(1, "vm1/a.raw", 6 * BS)
        model.resize(a.path, a.size)
        model.write(a.path, 0, bytes(BS))
        with open(loops[0], "r+b") as f:  # stale bytes past the old end must not show through
            f.seek(5 * BS)
            f.write(b"\xff" * BS)
        await link.send_cycle(header("vm1", 2, a, b), aiter_blocks([(0, 0, None)]))
        assert device_bytes(loops[0], a.size) == bytes(model.files[a.path])

        # Hashes of the device copy, found by disk_id.
        expect = [None if not any(model.block(a.path, i, BS)) else xxhash.xxh3_128_digest(model.block(a.path, i, BS))
                  for i in range(6)]
        assert (await link.fetch_hashes("vm1", a)).digests == expect

        # Rename a to c: its content moves to c's device.
        c = disk(1, "vm1/c.raw", 6 * BS)
        model.files[c.path] = model.files.pop(a.path)
        await link.send_cycle(header("vm1", 3, c, b), aiter_blocks([(0, 5, b"C" * BS)]))
        model.write(c.path, 5 * BS, b"C" * BS)
        assert device_bytes(loops[2], c.size) == bytes(model.files[c.path])
        assert device_bytes(loops[1], b.size) == bytes(model.files[b.path])

        # A disk larger than its device, and a disk without a device, are refused
        # before staging, for this group alone: the connection goes on.
        with pytest.raises(CycleRefused, match="larger than"):
            await link.send_cycle(header("vm1", 4, disk(1, "vm1/c.raw", DEV_SIZE + 1), b), aiter_blocks([]))
        with pytest.raises(CycleRefused, match="has no device"):
            await link.send_cycle(header("vm1", 4, c, b, disk(7, "vm1/d.raw", BS)), aiter_blocks([]))
        await link.aclose()
        link = await connect(server)
        assert link.points == {"vm1": 3}
        await link.aclose()
        assert device_bytes(loops[2], c.size) == bytes(model.files[c.path])
        status = sorted(store_status(f"dev:{mapfile}"), key=lambda d: d["path"])
        assert [(d["path"], d["size"], d["point"]["id"]) for d in status] == [
            ("vm1/b.raw", BS, 3), ("vm1/c.raw", 6 * BS, 3)]
    finally:
        server.stop()


async def test_points_test_failover_and_failover_from_devices(tmp_path: Path, loops: list[str]) -> None:
    """A dev: store keeps older points as undo data beside its map, and every
    recovery command reads them: `vrfs points`, test failover (raw and qcow2)
    of an older point, and failover, each compared with what the source held
    at the cut; the devices themselves stay at the newest point."""
    mapfile = tmp_path / "devices.map"
    mapfile.write_text(f"hv1/vm1/a.raw {loops[0]}\nhv1/vm1/b.raw {loops[1]}\n")
    server = Server(f"dev:{mapfile}", tmp_path / "serve.log")
    server.args = ("--retain", "1h:1s")
    store = f"dev:{mapfile}"
    model, held = Model(), {}
    a = disk(1, "vm1/a.raw", 20 * BS + 512)  # over 1 MiB: a qcow2 overlay, not a plain copy
    b = disk(2, "vm1/b.raw", 3 * BS)
    now = time.time()

    async def cycle(link, cycle_id: int, disks: tuple, blocks: list) -> None:
        for d in disks:
            model.resize(d.path, d.size)
        for path in list(model.files):
            if path not in {d.path for d in disks}:
                del model.files[path]
        for index, block, data in blocks:
            d = disks[index]
            model.write(d.path, block * BS, data if data is not None else bytes(min(BS, d.size - block * BS)))
        hdr = CycleHeader(group="vm1", cycle_id=cycle_id, cut_time=now - 60 + 2 * cycle_id, disks=disks)
        await link.send_cycle(hdr, aiter_blocks(blocks))
        held[cycle_id] = {p: bytes(v) for p, v in model.files.items()}

    try:
        server.start()
        link = await connect(server)
        await cycle(link, 1, (a, b), [(0, i, bytes([65 + i]) * BS) for i in range(20)] + [(1, 0, b"B" * BS)])
        await cycle(link, 2, (a, b), [(0, 0, None), (0, 7, b"x" * BS), (1, 2, b"b" * BS)])
        a = disk(1, "vm1/a.raw", 24 * BS)  # grows; b is deleted
        await cycle(link, 3, (a,), [(0, 7, b"y" * BS), (0, 23, b"z" * BS)])
        assert device_bytes(loops[0], a.size) == held[3]["vm1/a.raw"]

        points = json.loads(vrfs("points", "--store", store, "hv1/vm1", "--json").stdout)  # through the server
        assert [p["id"] for p in points] == [1, 2, 3], points
        assert points[0]["bytes_kept"] > 0

        raw = tmp_path / "tf-raw"
        out = vrfs("test-failover", "--store", store, "hv1/vm1", "--point", "1", "--to", str(raw),
                   "--format", "raw").stdout
        assert "raw image of point 1" in out, out
        for path, content in held[1].items():
            assert (raw / path).read_bytes() == content, path

        overlay = tmp_path / "tf-qcow2"
        vrfs("test-failover", "--store", store, "hv1/vm1", "--point", "2", "--to", str(overlay))
        for path, content in held[2].items():
            expected = tmp_path / "expected.raw"
            expected.write_bytes(content)
            assert subprocess.run(["qemu-img", "compare", "-q", str(overlay / path), str(expected)]).returncode == 0
        vrfs("test-failover", "--cleanup", str(overlay))
        vrfs("test-failover", "--cleanup", str(raw))

        # Failover of the older point: images made from devices plus undo data; the source is fenced.
        to = tmp_path / "failed-over"
        out = vrfs("failover", "--store", store, "hv1/vm1", "--point", "2", "--to", str(to)).stdout
        assert "fenced" in out and "(copy)" in out, out
        for path, content in held[2].items():
            assert (to / path).read_bytes() == content, path
        with pytest.raises(CycleRefused, match="failed over"):
            await link.send_cycle(header("vm1", 4, a), aiter_blocks([(0, 1, b"late" * (BS // 4))]))
        assert device_bytes(loops[0], a.size) == held[3]["vm1/a.raw"]
        await link.aclose()
    finally:
        server.stop()
    # And without a server: the command holds the store itself.
    points = json.loads(vrfs("points", "--store", store, "hv1/vm1", "--json").stdout)
    assert [p["id"] for p in points] == [1, 2, 3] and points[-1]["fenced"]
