"""Hostile and broken peers against a real `vrfs serve`: each connection is closed
with a log line naming the peer and the reason, the store is untouched, and a
well-behaved source is served afterwards."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import zstandard

from vrfs import wire
from vrfs.wire import MsgType

from servehelpers import Server, aiter_blocks, connect, disk, header, tree_digest

pytestmark = pytest.mark.timeout(60)
BS = 65536
DISK = disk(1, "vm1/a.raw", 4 * BS)


def frame(ftype: int, payload: bytes, *, checksum: int | None = None, length: int | None = None,
          magic: bytes = wire.MAGIC, version: int = wire.VERSION) -> bytes:
    import xxhash
    return wire.FRAME_HEADER.pack(magic, version, ftype, 0, len(payload) if length is None else length,
                                  xxhash.xxh3_64_intdigest(payload) if checksum is None else checksum) + payload


def control(ftype: MsgType, obj: dict) -> bytes:
    return frame(ftype, json.dumps(obj).encode())


HELLO = control(MsgType.HELLO, {"source": "hv1"})


def begin(cycle_id: int = 2, **disk_changes: object) -> bytes:
    obj = wire.header_to_json(header("vm1", cycle_id, DISK))
    obj["disks"][0].update(disk_changes)
    return control(MsgType.CYCLE_BEGIN, obj)


def batch(records: list[tuple[int, int, int, int]], body: bytes, raw: int) -> bytes:
    payload = wire.BATCH_HEADER.pack(len(records), raw) + b"".join(wire.BATCH_RECORD.pack(*r) for r in records)
    return frame(MsgType.BATCH, payload + body)


def good_batch() -> bytes:
    return wire.encode_batch([(0, 0, b"E" * BS)], 1).frame


BOMB = zstandard.ZstdCompressor().compress(bytes(512 << 20))

# (name, bytes sent after connecting, reason expected in the receiver's log)
CASES = [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
    ("bad version", frame(MsgType.HELLO, b"{}", version=7), "unsupported protocol version"),
    ("oversized frame", HELLO + frame(MsgType.BATCH, b"", length=1 << 31), "exceeds the bound"),
    ("bad checksum", HELLO + frame(MsgType.CYCLE_BEGIN, b"{}", checksum=12345), "checksum mismatch"),
    ("unknown type", HELLO + frame(77, b"{}"), "unknown frame type"),
    ("no hello", begin(), "expected HELLO"),
    ("bad source", control(MsgType.HELLO, {"source": "../etc"}), "bad source name"),
    ("dotdot path", HELLO + begin(path="vm1/../../etc/passwd"), "bad path"),
    ("absolute path", HELLO + begin(path="/etc/passwd"), "bad path"),
    ("nul path", HELLO + begin(path="vm1/a\0b"), "bad path"),
    ("state dir", HELLO + control(MsgType.CYCLE_BEGIN, dict(wire.header_to_json(header("vm1", 2, DISK)),
                                                            group=".vrfs")), "bad group"),
    ("huge size", HELLO + begin(size=1 << 60), "outside"),
    ("block beyond disk", HELLO + begin() + batch([(0, 4, 0, BS)], zstandard.ZstdCompressor().compress(b"x" * BS), BS),
     "beyond the end"),
    ("decompression bomb", HELLO + begin() + batch([(0, 0, 0, BS)], BOMB, BS), "decompresses to more"),
    ("truncated stream", HELLO + begin() + wire.encode_batch([(0, 0, __import__("os").urandom(BS))], 1).frame[:1000],
     "truncated"),
    ("end inside cycle", HELLO + begin() + good_batch(), "connection closed by peer"),
    ("bad manifest", HELLO + begin() + good_batch() + control(MsgType.CYCLE_END, {"blocks": 1, "manifest": "00"}),
     "manifest hash does not match"),
    ("wrong count", HELLO + begin() + good_batch() + control(MsgType.CYCLE_END, {"blocks": 5, "manifest": "00"}),
     "manifest declares 5"),
    ("batch outside cycle", HELLO + good_batch(), "unexpected BATCH"),
    ("not json", HELLO + frame(MsgType.HASHES_REQ, b"\xff{"), "not JSON"),
    ("hashes outside group", HELLO + control(MsgType.HASHES_REQ, {"group": "vm1", "disk": dict(
        wire.disk_to_json(DISK), path="vm2/x")}), "outside group"),
]


def attack(port: int, data: bytes) -> bytes:
    """Send data, then read until the receiver closes; returns what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiver may already have refused and closed
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


async def test_hostile_peers(tmp_path: Path) -> None:
    store = tmp_path / "replicas"
    server = Server(f"dir:{store}", tmp_path / "serve.log")
    server.insecure = True  # the test speaks raw frames
    try:
        server.start()
        link = await connect(server)
        await link.send_cycle(header("vm1", 1, DISK), aiter_blocks([(0, 1, b"G" * BS)]))
        await link.aclose()
        before = tree_digest(store)

        for name, data, reason in CASES:
            log_at = len(server.log())
            answer = attack(server.port, data)
            deadline = time.monotonic() + 5
            while reason not in server.log()[log_at:] and time.monotonic() < deadline:
                time.sleep(0.02)
            new_log = server.log()[log_at:]
            assert reason in new_log and "127.0.0.1:" in new_log and "closing connection" in new_log, (name, new_log)
            if answer:  # when the receiver got to answer, it said why
                assert reason in answer.decode(errors="replace"), (name, answer[-300:])
            assert tree_digest(store) == before, name
            assert server.proc is not None and server.proc.poll() is None, name

        # A stale cycle is refused for its group alone: the rest of it is read
        # and dropped, the answer says why, and the connection stays open.
        log_at = len(server.log())
        answer = attack(server.port, HELLO + begin(cycle_id=1) + good_batch()
                        + control(MsgType.CYCLE_END, {"blocks": 1, "manifest": "00"}))
        assert b"not newer" in answer and bytes([MsgType.CYCLE_REFUSED]) in answer, answer[-300:]
        assert "not newer" in server.log()[log_at:] and "closing connection" not in server.log()[log_at:]
        assert tree_digest(store) == before

        # A connection that says nothing and one that stalls mid-frame do not block others.
        idle = socket.create_connection(("127.0.0.1", server.port))
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(HELLO + begin()[:30])
        try:
            link = await connect(server)
            await link.send_cycle(header("vm1", 2, DISK), aiter_blocks([(0, 2, b"H" * BS), (0, 1, None)]))
            assert (await link.fetch_hashes("vm1", DISK)).digests == [None, None, __import__("xxhash").xxh3_128_digest(b"H" * BS),
                                                            None]
            await link.aclose()
        finally:
            idle.close()
            stalled.close()
        assert (store / "hv1/vm1/a.raw").read_bytes() == bytes(2 * BS) + b"H" * BS + bytes(BS)
        assert server.stop() == 0
    finally:
        server.stop()
