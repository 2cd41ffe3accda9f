"""A damaged file at the DR site concerns its group alone: a torn metadata
file or a garbage commit record is named in the log and in `vrfs status
--store`, the server starts and serves every other group, and that group's
cycles are refused, not the connection. A source that goes silent inside a
cycle releases its group after the idle timeout."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from mounthelpers import vrfs
from servehelpers import Server, aiter_blocks, connect, disk, header
from vrfs import wire
from vrfs.link import CycleRefused
from vrfs.wire import MsgType

pytestmark = pytest.mark.timeout(90)
BS = 65536


def store_status(url: str) -> dict[str, dict]:
    return {d["path"]: d for d in json.loads(vrfs("status", "--store", url, "--json").stdout)}


async def test_damaged_metadata_and_commit_record_stay_in_their_group(tmp_path: Path) -> None:
    store = tmp_path / "store"
    url = f"dir:{store}"
    server = Server(url, tmp_path / "serve.log")
    try:
        server.start()
        link = await connect(server)
        for group, n in (("vm1", 1), ("vm2", 2), ("vm3", 3)):
            await link.send_cycle(header(group, 1, disk(n, f"{group}/a.raw", BS)), aiter_blocks([(0, 0, b"x" * BS)]))
        await link.aclose()
        server.stop()

        (store / ".vrfs/meta/hv1/vm1.json").write_bytes(b'{"cycle_id": 1, "cut_ti')  # torn
        journal = store / ".vrfs/journal/hv1/vm2"
        journal.mkdir(parents=True)
        (journal / "blocks").write_bytes(b"")
        (journal / "commit.json").write_bytes(b"\x00garbage")
        server.start()  # starts all the same
        log = server.log()
        assert "commit.json is damaged" in log, log

        status = store_status(url)
        assert status["vm1/*"]["state"] == "damaged" and "vm1.json" in status["vm1/*"]["error"]
        assert status["vm2/a.raw"]["state"] == "incomplete" and "damaged" in status["vm2/a.raw"]["error"]
        assert status["vm3/a.raw"]["state"] == "ok"

        link = await connect(server)  # the handshake works for this source
        assert link.points == {"vm2": 1, "vm3": 1}
        for group, n in (("vm1", 1), ("vm2", 2)):
            with pytest.raises(CycleRefused, match="damaged"):
                await link.send_cycle(header(group, 2, disk(n, f"{group}/a.raw", BS)), aiter_blocks([]))
        await link.send_cycle(header("vm3", 2, disk(3, "vm3/a.raw", BS)), aiter_blocks([(0, 0, b"y" * BS)]))
        assert (store / "hv1/vm3/a.raw").read_bytes() == b"y" * BS
        await link.aclose()
    finally:
        server.stop()


async def test_a_source_silent_inside_a_cycle_releases_its_group(tmp_path: Path) -> None:
    server = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log", env={"VRFS_CYCLE_IDLE_TIMEOUT": "2"})
    server.insecure = True  # the test speaks raw frames
    try:
        server.start()
        hello = wire.encode_frame(MsgType.HELLO, json.dumps({"source": "hv1"}).encode())
        begin = wire.encode_frame(MsgType.CYCLE_BEGIN, json.dumps(
            wire.header_to_json(header("vm1", 1, disk(1, "vm1/a.raw", BS)))).encode())
        silent = socket.create_connection(("127.0.0.1", server.port))
        try:
            silent.sendall(hello + begin)  # and then nothing
            time.sleep(0.5)
            link = await connect(server)
            started = time.monotonic()
            while True:
                try:
                    await link.send_cycle(header("vm1", 1, disk(1, "vm1/a.raw", BS)),
                                          aiter_blocks([(0, 0, b"z" * BS)]))
                    break
                except CycleRefused as exc:
                    assert "busy" in str(exc)
                    assert time.monotonic() - started < 10, "the silent source held the group"
                    time.sleep(0.3)
            await link.aclose()
            assert "inside a cycle" in server.log()
        finally:
            silent.close()
    finally:
        server.stop()
