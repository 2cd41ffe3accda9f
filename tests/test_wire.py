"""The wire format on its own: round trips, and every hostile input refused as ProtocolError."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
import zstandard

from vrfs import wire
from vrfs.cycle import MAX_DISK_SIZE
from vrfs.wire import MsgType, ProtocolError

from servehelpers import disk, header

pytestmark = pytest.mark.timeout(30)

D0 = disk(1, "vm1/disk0.raw", 3 * 65536 + 100)
D1 = disk(2, "vm1/sub/disk1.raw", 65536)
HDR = header("vm1", 7, D0, D1)


def test_header_round_trip() -> None:
    assert wire.header_from_json(wire.header_to_json(HDR)) == HDR


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "vm1/../x", "vm1/a\0b", "vm2/disk",
                                  ".vrfs/x", "vm1//x", "vm1/./x", ""])
def test_header_refuses_bad_paths(path: str) -> None:
    obj = wire.header_to_json(HDR)
    obj["disks"][0]["path"] = path
    with pytest.raises(ProtocolError):
        wire.header_from_json(obj)


@pytest.mark.parametrize("group", ["..", ".vrfs", "a/b", "", "x\0"])
def test_header_refuses_bad_groups(group: str) -> None:
    obj = wire.header_to_json(HDR)
    obj["group"] = group
    with pytest.raises(ProtocolError):
        wire.header_from_json(obj)


@pytest.mark.parametrize("change", [
    {"size": MAX_DISK_SIZE + 1}, {"size": -1}, {"size": True}, {"block_size": 1000}, {"block_size": 8 << 20},
    {"disk_id": "zz" * 16}, {"disk_id": "00"},
])
def test_header_refuses_bad_disks(change: dict) -> None:
    obj = wire.header_to_json(HDR)
    obj["disks"][0].update(change)
    with pytest.raises(ProtocolError):
        wire.header_from_json(obj)


def test_header_refuses_duplicates_and_disk_under_disk() -> None:
    obj = wire.header_to_json(header("vm1", 1, D0, disk(3, "vm1/disk0.raw", 10)))
    with pytest.raises(ProtocolError, match="duplicate"):
        wire.header_from_json(obj)
    obj = wire.header_to_json(header("vm1", 1, disk(1, "vm1/a", 10), disk(2, "vm1/a/b", 10)))
    with pytest.raises(ProtocolError, match="under another disk"):
        wire.header_from_json(obj)


def _batch_payload(blocks: list, level: int = 1) -> bytes:
    frame = wire.encode_batch(blocks, level).frame
    return frame[wire.FRAME_HEADER.size:]


def test_batch_round_trip_and_zero_detection() -> None:
    blocks = [(0, 0, b"a" * 65536), (0, 1, bytes(65536)), (0, 3, b"z" * 100), (1, 0, None)]
    encoded = wire.encode_batch(blocks, 1)
    payload = encoded.frame[wire.FRAME_HEADER.size:]
    decoded = wire.decode_batch(payload, HDR.disks)
    assert decoded.count == 4 and decoded.manifest == encoded.manifest
    # The all-zero block travels as a zero record, without payload.
    count, raw = wire.BATCH_HEADER.unpack_from(payload)
    assert (count, raw) == (4, 65536 + 100)
    records = []
    at = 0
    while at < len(decoded.journal):
        di, bi, kind, length = wire.BATCH_RECORD.unpack_from(decoded.journal, at)
        at += wire.BATCH_RECORD.size
        records.append((di, bi, kind, decoded.journal[at:at + length]))
        at += length
    assert records == [(0, 0, 0, b"a" * 65536), (0, 1, 1, b""), (0, 3, 0, b"z" * 100), (1, 0, 1, b"")]


def test_runs_encode_as_their_blocks() -> None:
    """A run of consecutive blocks (the shipper's reads, cut up in a worker
    thread) makes the very frame its blocks make one by one, zero blocks
    inside a run included; the disk's short last block ends a run."""
    bs = 65536
    data = b"a" * bs + bytes(bs) + b"c" * bs + b"z" * 100
    blocks = [(0, 0, data[:bs]), (0, 1, data[bs:2 * bs]), (0, 2, data[2 * bs:3 * bs]), (0, 3, data[3 * bs:]),
              (1, 0, None)]
    runs = [(0, 0, memoryview(data)[:2 * bs]), (0, 2, memoryview(data)[2 * bs:]), (1, 0, None)]
    by_block = wire.encode_batch(blocks, wire.RAW)
    by_run = wire.encode_batch(runs, wire.RAW, block_sizes=[d.block_size for d in HDR.disks])
    assert by_run.frame == by_block.frame and by_run.manifest == by_block.manifest and by_run.count == 5
    decoded = wire.decode_batch(by_run.frame[wire.FRAME_HEADER.size:], HDR.disks, wire.FLAG_RAW_BODY)
    assert decoded.count == 5 and decoded.manifest == by_block.manifest


@pytest.mark.parametrize("blocks, message", [
    ([(0, 4, b"x" * 65536)], "beyond the end"),
    ([(2, 0, b"x" * 65536)], "names disk 2"),
    ([(0, 0, b"x" * 100)], "has length"),
    ([(0, 3, b"x" * 65536)], "has length"),  # the last block is short
])
def test_batch_refuses_bad_records(blocks: list, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode_batch(_batch_payload(blocks), HDR.disks)


def test_batch_refuses_decompression_bomb() -> None:
    # One 64 KiB record whose body decompresses to 256 MiB: refused without inflating it.
    records = wire.BATCH_HEADER.pack(1, 65536) + wire.BATCH_RECORD.pack(0, 0, wire.KIND_DATA, 65536)
    bomb = zstandard.ZstdCompressor().compress(bytes(256 << 20))
    with pytest.raises(ProtocolError, match="decompresses to more"):
        wire.decode_batch(records + bomb, HDR.disks)
    # Zero-only batch carrying a body anyway.
    records = wire.BATCH_HEADER.pack(1, 0) + wire.BATCH_RECORD.pack(0, 0, wire.KIND_ZERO, 0)
    with pytest.raises(ProtocolError):
        wire.decode_batch(records + bomb, HDR.disks)


def test_batch_refuses_garbage_and_lies() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_batch(b"\x00\x00", HDR.disks)
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_batch(wire.BATCH_HEADER.pack(1 << 20, 0), HDR.disks)
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode_batch(wire.BATCH_HEADER.pack(5, 0), HDR.disks)
    records = wire.BATCH_HEADER.pack(1, 65536) + wire.BATCH_RECORD.pack(0, 0, wire.KIND_DATA, 65536)
    with pytest.raises(ProtocolError, match="corrupt"):
        wire.decode_batch(records + b"not zstd at all", HDR.disks)
    records = wire.BATCH_HEADER.pack(1, 0) + wire.BATCH_RECORD.pack(0, 0, 9, 0)
    with pytest.raises(ProtocolError, match="kind"):
        wire.decode_batch(records, HDR.disks)


def test_hashes_round_trip() -> None:
    digests = [b"a" * 16, None, b"b" * 16]
    assert wire.decode_hashes(wire.encode_hashes(5, digests), 5) == digests
    with pytest.raises(ProtocolError):
        wire.decode_hashes(wire.encode_hashes(5, digests), 0)
    with pytest.raises(ProtocolError):
        wire.decode_hashes(wire.encode_hashes(5, digests)[:-1], 5)


def _frames() -> tuple[trio.testing.MemorySendStream, wire.FrameStream]:
    a, b = trio.testing.memory_stream_pair()
    return a, wire.FrameStream(b, trio.CapacityLimiter(1), frame_timeout=1)


async def test_frame_round_trip() -> None:
    a, frames = _frames()
    big = bytes(range(256)) * 8192  # above the threading threshold
    await a.send_all(wire.encode_frame(MsgType.HELLO, b'{"source":"x"}') + wire.encode_frame(MsgType.BATCH, big))
    await a.send_eof()
    first = await frames.receive()
    assert first is not None and first.type == MsgType.HELLO and wire.decode_control(first.payload) == {"source": "x"}
    second = await frames.receive()
    assert second is not None and second.payload == big
    assert await frames.receive() is None  # a clean end between frames


def _header(magic: bytes = wire.MAGIC, version: int = wire.VERSION, ftype: int = MsgType.HELLO,
            length: int = 0, checksum: int = 0) -> bytes:
    return wire.FRAME_HEADER.pack(magic, version, ftype, 0, length, checksum)


@pytest.mark.parametrize("data, message", [
    (_header(magic=b"HTTP"), "bad magic"),
    (_header(version=9), "version"),
    (_header(ftype=200), "unknown frame type"),
    (_header(length=2 << 20), "exceeds the bound"),
    (_header(ftype=MsgType.BATCH, length=1 << 30), "exceeds the bound"),
    (_header(length=3, checksum=1) + b"abc", "checksum"),
    (_header(length=100) + b"short", "truncated"),
    (b"VRF", "truncated"),
])
async def test_frame_refusals(data: bytes, message: str) -> None:
    a, frames = _frames()
    await a.send_all(data)
    await a.send_eof()
    with pytest.raises(ProtocolError, match=message):
        await frames.receive()


async def test_frame_stall_times_out() -> None:
    a, frames = _frames()
    await a.send_all(_header(length=100) + b"x")
    with pytest.raises(ProtocolError, match="not completed"):
        await frames.receive()


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1,2]", b"not json", b"[" * 200000, b"9" * 10000])
def test_control_refusals(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_control(payload)


def test_field_types() -> None:
    with pytest.raises(ProtocolError):
        wire.int_field({"n": True}, "n", 0, 10)
    with pytest.raises(ProtocolError):
        wire.int_field({"n": 11}, "n", 0, 10)
    with pytest.raises(ProtocolError):
        wire.field({}, "n", int)
    assert wire.int_field({"n": 3}, "n", 0, 10) == 3
    assert struct.calcsize(">4sBBHIQ") == wire.FRAME_HEADER.size
