"""A real `vrfs serve` process with a dir: store, driven by Link over 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from vrfs.link import CycleRefused, Link, LinkError
from vrfs.store import store_status
from vrfs.wire import BATCH_RECORD

from tlshelpers import serve_args
from servehelpers import (
    Model,
    Server,
    aiter_blocks,
    connect,
    disk,
    free_port,
    header,
    vrfs_command,
    vrfs_env,
)

pytestmark = pytest.mark.timeout(60)
BS = 65536


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "replicas"


@pytest.fixture
def server(tmp_path: Path, store: Path) -> Iterator[Server]:
    s = Server(f"dir:{store}", tmp_path / "serve.log")
    try:
        yield s.start()
    finally:
        s.stop()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def assert_replica(store: Path, model: Model, source: str = "hv1") -> None:
    base = store / source
    found = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}
    assert found == set(model.files)
    for path, content in model.files.items():
        assert (base / path).read_bytes() == bytes(content), path


async def send(link: Link, model: Model, hdr, writes: list[tuple[int, int, bytes | None]]) -> None:  # type: ignore[no-untyped-def]
    """Apply writes (disk index, block index, data) to the model after resizing, then ship them."""
    for d in hdr.disks:
        model.resize(d.path, d.size)
    for di, bi, data in writes:
        d = hdr.disks[di]
        model.write(d.path, bi * d.block_size, data if data is not None else bytes(min(BS, d.size - bi * BS)))
    await link.send_cycle(hdr, aiter_blocks(writes))


async def test_cycles_rename_delete_resize(server: Server, store: Path) -> None:
    model = Model()
    a = disk(1, "vm1/a.raw", 5 * BS + 123)
    b = disk(2, "vm1/b.raw", 2 * BS)
    link = await connect(server)
    assert link.points == {}
    await send(link, model, header("vm1", 1, a, b), [
        (0, 0, rand(BS, 1)), (0, 2, rand(BS, 2)), (0, 5, rand(123, 3)), (1, 1, rand(BS, 4))])
    assert_replica(store, model)
    # Zero blocks become holes in the sparse replica.
    await send(link, model, header("vm1", 2, a, b), [(0, 2, None), (0, 0, bytes(BS))])
    assert_replica(store, model)
    assert os.stat(store / "hv1/vm1/a.raw").st_blocks * 512 <= 2 * 4096 + 65536

    # Rename a into a subdirectory, delete b, create c, grow a, all in one cycle.
    a2 = disk(1, "vm1/sub/a.raw", 8 * BS)
    c = disk(3, "vm1/c.raw", BS + 7)
    model.files["vm1/sub/a.raw"] = model.files.pop("vm1/a.raw")
    del model.files["vm1/b.raw"]
    await send(link, model, header("vm1", 3, a2, c), [(0, 7, rand(BS, 5)), (1, 1, rand(7, 6))])
    assert_replica(store, model)

    # Shrink, and a top-level file that is a group of its own.
    a3 = disk(1, "vm1/sub/a.raw", BS + 1)
    await send(link, model, header("vm1", 4, a3, c), [])
    top = disk(9, "notes.txt", 10, 4096)
    await send(link, model, header("notes.txt", 1, top), [(0, 0, b"0123456789")])
    assert_replica(store, model)
    sent = link.bytes_sent
    assert sent > 4 * BS
    await link.aclose()

    # A new connection learns the points; `vrfs status --store` lists the disks.
    link = await connect(server)
    assert link.points == {"vm1": 4, "notes.txt": 1}
    await link.aclose()
    status = sorted(store_status(f"dir:{store}"), key=lambda d: d["path"])
    assert status == [
        {"source": "hv1", "path": "notes.txt", "size": 10, "point": {"id": 1, "cut_time": 1_700_000_001.0},
         "state": "ok"},
        {"source": "hv1", "path": "vm1/c.raw", "size": BS + 7, "point": {"id": 4, "cut_time": 1_700_000_004.0},
         "state": "ok"},
        {"source": "hv1", "path": "vm1/sub/a.raw", "size": BS + 1, "point": {"id": 4, "cut_time": 1_700_000_004.0},
         "state": "ok"},
    ]
    assert not list((store / ".vrfs/journal").rglob("blocks"))


async def test_swap_and_stale_cycle(server: Server, store: Path) -> None:
    model = Model()
    x, y = disk(1, "vm1/x", BS), disk(2, "vm1/y", BS)
    link = await connect(server)
    await send(link, model, header("vm1", 5, x, y), [(0, 0, b"X" * BS), (1, 0, b"Y" * BS)])
    # Two disks swap names in one cycle.
    await send(link, model, header("vm1", 6, disk(1, "vm1/y", BS), disk(2, "vm1/x", BS)), [])
    model.files = {"vm1/x": bytearray(b"Y" * BS), "vm1/y": bytearray(b"X" * BS)}
    assert_replica(store, model)
    # A disk's directory is emptied and a new disk takes its name, in one cycle.
    deep = disk(3, "vm1/d/deep.raw", BS)
    await send(link, model, header("vm1", 7, disk(1, "vm1/y", BS), disk(2, "vm1/x", BS), deep),
               [(2, 0, b"D" * BS)])
    assert_replica(store, model)
    del model.files["vm1/d/deep.raw"]
    await send(link, model, header("vm1", 8, disk(1, "vm1/y", BS), disk(2, "vm1/x", BS), disk(4, "vm1/d", BS)),
               [(2, 0, b"F" * BS)])
    assert_replica(store, model)
    x, y = disk(1, "vm1/x", BS), disk(2, "vm1/y", BS)
    # A cycle that is not newer than the point is refused, and changes nothing.
    # It concerns that group alone: the connection goes on.
    with pytest.raises(CycleRefused, match="not newer") as refused:
        await link.send_cycle(header("vm1", 8, x, y), aiter_blocks([(0, 0, b"Q" * BS)]))
    assert refused.value.point == 8 and not refused.value.resync
    assert_replica(store, model)
    assert (await link.fetch_hashes("vm1", disk(1, "vm1/y", BS))).digests == [xxhash.xxh3_128_digest(b"X" * BS)]


async def test_fetch_hashes_on_seeded_copy(server: Server, store: Path) -> None:
    size = 6 * BS + 1000
    seed = bytearray(size)
    seed[0:BS] = rand(BS, 10)
    seed[3 * BS:3 * BS + 10] = b"0123456789"
    seed[6 * BS:] = rand(1000, 11)
    path = store / "hv1/vm1/seeded.raw"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:  # sparse: blocks 1, 2, 4, 5 are holes or zeros
        f.write(seed[:BS])
        f.seek(3 * BS)
        f.write(seed[3 * BS:4 * BS])
        f.seek(6 * BS)
        f.write(seed[6 * BS:])
    d = disk(4, "vm1/seeded.raw", size)
    link = await connect(server)
    seeded = await link.fetch_hashes("vm1", d)
    hashes = seeded.digests
    expect = [None if not any(seed[i:i + BS]) else xxhash.xxh3_128_digest(bytes(seed[i:i + BS]))
              for i in range(0, size, BS)]
    assert hashes == expect
    assert await link.fetch_hashes("vm1", disk(5, "vm1/absent.raw", BS)) is None

    # The source sends only the differing blocks, naming the copy it compared
    # with; the seed becomes the replica.
    model = Model()
    model.files["vm1/seeded.raw"] = bytearray(seed)
    await send(link, model, dataclasses.replace(header("vm1", 1, d), full_sync={d.disk_id: seeded.basis}),
               [(0, 4, rand(BS, 12))])
    assert_replica(store, model)
    # Renamed later: found by disk_id, not by path.
    assert (await link.fetch_hashes("vm1", disk(4, "vm1/other-name.raw", size))).digests == [
        None if not any(model.block("vm1/seeded.raw", i, BS)) else
        xxhash.xxh3_128_digest(model.block("vm1/seeded.raw", i, BS)) for i in range(7)]
    await link.aclose()


async def test_kill_after_commit_redoes_apply(tmp_path: Path, store: Path) -> None:
    server = Server(f"dir:{store}", tmp_path / "serve.log", env={"VRFS_TEST_CRASH": "committed"})
    model = Model()
    a = disk(1, "vm1/a.raw", 4 * BS)
    try:
        server.start()
        link = await connect(server)
        with pytest.raises(LinkError):
            await send(link, model, header("vm1", 1, a), [(0, 1, rand(BS, 20)), (0, 3, rand(BS, 21))])
        assert server.wait() == -9
        assert (store / ".vrfs/journal/hv1/vm1/commit.json").exists()
        assert not (store / "hv1/vm1/a.raw").exists()  # died before apply
        server.env = {}
        server.start()
        assert_replica(store, model)
        link = await connect(server)
        assert link.points == {"vm1": 1}
        await link.aclose()
        assert "redid apply of hv1/vm1 cycle 1" in server.log()
    finally:
        server.stop()


async def test_kill_during_staging_keeps_previous_point(tmp_path: Path, store: Path) -> None:
    server = Server(f"dir:{store}", tmp_path / "serve.log")
    model = Model()
    a = disk(1, "vm1/a.raw", 64 * BS)
    try:
        server.start()
        link = await connect(server)
        await send(link, model, header("vm1", 1, a), [(0, i, rand(BS, i)) for i in range(0, 64, 3)])
        await link.aclose()
        server.stop()
        server.env = {"VRFS_TEST_CRASH": "staging"}
        server.start()
        link = await connect(server)
        with pytest.raises(LinkError):
            # Several batches: the receiver dies after staging the first.
            await link.send_cycle(header("vm1", 2, a), aiter_blocks([(0, i, rand(BS, 100 + i)) for i in range(64)]))
        assert server.wait() == -9
        server.env = {}
        server.start()
        assert_replica(store, model)
        assert "discarded uncommitted staging of hv1/vm1" in server.log()
        assert not any((store / ".vrfs/journal").rglob("*.json"))
        link = await connect(server)
        assert link.points == {"vm1": 1}
        await link.aclose()
    finally:
        server.stop()


def test_serve_startup_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    busy = Server(f"dir:{tmp_path / 'busy'}", tmp_path / "busy.log")
    busy.start()
    try:
        cases = [
            (["--listen", "127.0.0.1:0x", "--store", f"dir:{tmp_path}/s"], "bad listen address"),
            (["--listen", f"127.0.0.1:{free_port()}", "--store", "nfs:/x"], "bad store URL"),
            (["--listen", f"127.0.0.1:{free_port()}", "--store", f"dir:{a_file}"], "not a directory"),
            (["--listen", f"127.0.0.1:{busy.port}", "--store", f"dir:{tmp_path}/s2"], "cannot listen"),
            (["--listen", f"127.0.0.1:{free_port()}", "--store", f"dir:{tmp_path / 'busy'}"], "in use"),
            (["--listen", f"127.0.0.1:{free_port()}", "--store", f"dev:{tmp_path}/nomap"], "cannot read device map"),
        ]
        for args, message in cases:
            for mode in (["--foreground"], []):
                r = subprocess.run(vrfs_command("serve", *mode, *args, *serve_args()), env=vrfs_env(),
                                   capture_output=True,
                                   text=True, timeout=20)
                assert r.returncode != 0, (args, r.stderr)
                assert r.stderr.startswith("vrfs: ") and message in r.stderr, (args, r.stderr)
                assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    finally:
        busy.stop()


def test_daemon_mode_and_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "d"
    port = free_port()
    r = subprocess.run(vrfs_command("serve", "--listen", f"127.0.0.1:{port}", "--store", f"dir:{store}",
                                    *serve_args()),
                       env=vrfs_env(), capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    pid = int((store / ".vrfs/serve.pid").read_text())
    try:
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert "serving dir:" in (store / ".vrfs/serve.log").read_text()
    finally:
        os.kill(pid, 15)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        __import__("time").sleep(0.05)
    else:
        os.kill(pid, 9)
        raise AssertionError("daemon ignored SIGTERM")
    assert "SIGTERM: shutting down" in (store / ".vrfs/serve.log").read_text()
    assert json.loads(json.dumps(store_status(f"dir:{store}"))) == []


async def test_direct_staging_writes_once_and_redo_places_each_replica(tmp_path: Path, store: Path) -> None:
    """Disks that a cycle builds from zeros (new to the store, or a full sync
    that found no copy) are staged whole as replicas-to-be in the journal:
    their blocks are not journaled, nothing is visible before commit, and a
    kill -9 after each rename into place is redone to the same point."""
    model = Model()
    a = disk(1, "vm1/a.raw", 8 * BS)
    d = disk(4, "vm1/d.raw", 6 * BS)
    server = Server(f"dir:{store}", tmp_path / "serve.log")
    try:
        server.start()
        link = await connect(server)
        await send(link, model, header("vm1", 1, a, d), [(0, 1, rand(BS, 1))] + [(1, i, rand(BS, 10 + i))
                                                                                  for i in range(6)])
        await link.aclose()
        server.stop()
        point1 = Model()
        point1.files = {k: bytearray(v) for k, v in model.files.items()}

        b = disk(2, "vm1/b.raw", 5 * BS + 7)  # new, its full sync found no copy
        c = disk(3, "vm1/sub/c.raw", 3 * BS)  # new, sent without comparison
        hdr = dataclasses.replace(header("vm1", 2, a, b, c, d), full_sync={b.disk_id: None, d.disk_id: None})
        model.files[d.path] = bytearray(d.size)  # d is rebuilt from zeros
        writes = [(0, 2, rand(BS, 2)), (1, 0, rand(BS, 3)), (1, 1, None), (1, 5, rand(7, 4)),
                  (2, 2, rand(BS, 5)), (3, 3, rand(BS, 6))]
        server.env = {"VRFS_TEST_CRASH": "committed"}
        server.start()
        link = await connect(server)
        with pytest.raises(LinkError):
            await send(link, model, hdr, writes)
        assert server.wait() == -9
        journal = store / ".vrfs/journal/hv1/vm1"
        assert (journal / "commit.json").exists()
        assert json.loads((journal / "commit.json").read_bytes())["direct"] == sorted(
            x.disk_id.hex() for x in (b, c, d))
        # Only a's block was journaled; the others were written once, into their replicas-to-be.
        assert (journal / "blocks").stat().st_size == BATCH_RECORD.size + BS
        assert {p.name for p in (journal / "direct").iterdir()} == {x.disk_id.hex() for x in (b, c, d)}
        assert (journal / "direct" / b.disk_id.hex()).stat().st_size == b.size
        assert_replica(store, point1)  # nothing visible before apply: still the first point

        # Each rename into place is followed by a kill; every restart redoes the rest.
        kills = 0
        for _ in range(5):
            server.env = {"VRFS_TEST_CRASH": "direct-placed"}
            try:
                server.start()
                break
            except RuntimeError:
                assert server.wait() == -9
                kills += 1
        assert kills == 3
        assert_replica(store, model)
        assert not journal.exists()
        link = await connect(server)
        assert link.points == {"vm1": 2}
        await link.aclose()
    finally:
        server.stop()


async def test_kill_while_staging_whole_keeps_previous_point(tmp_path: Path, store: Path) -> None:
    server = Server(f"dir:{store}", tmp_path / "serve.log")
    model = Model()
    a = disk(1, "vm1/a.raw", 4 * BS)
    try:
        server.start()
        link = await connect(server)
        await send(link, model, header("vm1", 1, a), [(0, 1, rand(BS, 1))])
        await link.aclose()
        server.stop()
        server.env = {"VRFS_TEST_CRASH": "staging"}
        server.start()
        link = await connect(server)
        b = disk(2, "vm1/b.raw", 96 * BS)
        hdr = dataclasses.replace(header("vm1", 2, a, b), full_sync={b.disk_id: None})
        with pytest.raises(LinkError):  # several batches: the receiver dies after staging the first
            await link.send_cycle(hdr, aiter_blocks([(1, i, rand(BS, 100 + i)) for i in range(96)]))
        assert server.wait() == -9
        assert list((store / ".vrfs/journal/hv1/vm1/direct").iterdir())  # died with b half staged
        server.env = {}
        server.start()
        assert_replica(store, model)
        assert "discarded uncommitted staging of hv1/vm1" in server.log()
        assert not (store / ".vrfs/journal/hv1/vm1").exists()
        link = await connect(server)
        assert link.points == {"vm1": 1}
        await link.aclose()
    finally:
        server.stop()


def test_direct_disks_are_new_or_rebuilt_from_zeros_and_few(tmp_path: Path) -> None:
    from vrfs.store.dirstore import DirStore
    from vrfs.store.devstore import DevStore

    st = DirStore(f"dir:{tmp_path}", tmp_path)
    disks = [disk(n, f"vm1/d{n}.raw", n * BS) for n in range(1, 13)]
    hdr = dataclasses.replace(header("vm1", 1, *disks), full_sync={disks[0].disk_id: None,
                                                                    disks[11].disk_id: "seed:1.2.3@0"})
    # Compared with a seed: built on it, so journaled; the 8 largest of the others.
    assert sorted(st.direct_disks("hv1", hdr)) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert DevStore.stages_direct is False
