"""The per-batch compression decision (vrfs/compression.py) and raw batches on the wire."""

from __future__ import annotations

import os

import pytest

from vrfs import wire
from vrfs.compression import FAST_LEVEL, CompressionPolicy
from vrfs.cycle import DiskEntry
from vrfs.wire import ProtocolError

BS = 65536
DISKS = (DiskEntry(bytes(16), "vm1/a.raw", 8 * BS, BS),)
TEXT = b" ".join(str(i).encode() for i in range(20000))[:BS]


def feed(policy: CompressionPolicy, drain: float, speed: float, sample: float, ratio: float, n: int = 40) -> None:
    """Batches measured as if the link drained ``drain`` bytes/s and level 1 compressed at ``speed``."""
    for _ in range(n):
        level = policy.choose()
        if level is not None:
            factor = {FAST_LEVEL: 2.5, 1: 1.0}.get(level, 0.5)
            raw = 2 << 20
            body = int(raw * ratio * (1.2 if level == FAST_LEVEL else 1.0 if level == 1 else 0.9))
            policy.encoded(level, raw, body, raw / (speed * factor), sample)
            wire_bytes = body
        else:
            wire_bytes = 2 << 20
        policy.sent(wire_bytes, wire_bytes / drain)


def test_fast_link_sends_raw() -> None:
    policy = CompressionPolicy(3, threads=2, raw_allowed=True)
    assert policy.choose() == 1  # nothing measured yet: the old default
    feed(policy, drain=3e9, speed=500e6, sample=0.4, ratio=0.35)
    assert policy.current is None


def test_slow_link_compresses_harder_up_to_the_ceiling() -> None:
    policy = CompressionPolicy(3, threads=2, raw_allowed=True)
    feed(policy, drain=50e6, speed=500e6, sample=0.4, ratio=0.35)
    assert policy.current == 3
    policy = CompressionPolicy(1, threads=2, raw_allowed=True)
    feed(policy, drain=50e6, speed=500e6, sample=0.4, ratio=0.35)
    assert policy.current == 1  # --compress-level is the ceiling


def test_old_receiver_never_gets_raw() -> None:
    policy = CompressionPolicy(1, threads=2, raw_allowed=False)
    feed(policy, drain=3e9, speed=500e6, sample=0.4, ratio=0.35)
    assert policy.current == FAST_LEVEL
    assert None not in policy.levels


def test_incompressible_batch_goes_raw_outright() -> None:
    blocks = [(0, i, os.urandom(BS)) for i in range(4)]
    enc = wire.encode_batch(blocks, 3, skip_incompressible=True)
    assert enc.level is None and enc.sample_ratio is not None and enc.sample_ratio > 0.95
    assert enc.body_bytes == 4 * BS
    header = wire.FRAME_HEADER.unpack_from(enc.frame)
    assert header[3] == wire.FLAG_RAW_BODY
    decoded = wire.decode_batch(enc.frame[wire.FRAME_HEADER.size:], DISKS, header[3])
    assert decoded.manifest == enc.manifest
    # Compressible data is compressed.
    enc = wire.encode_batch([(0, 0, TEXT)], 3, skip_incompressible=True)
    assert enc.level == 3 and enc.body_bytes < BS // 2


@pytest.mark.parametrize("direct", [frozenset(), frozenset({0})])
def test_raw_batch_round_trip(direct: frozenset[int]) -> None:
    blocks = [(0, 0, TEXT), (0, 1, None), (0, 2, b"x" * BS)]
    enc = wire.encode_batch(blocks, wire.RAW)
    payload = enc.frame[wire.FRAME_HEADER.size:]
    decoded = wire.decode_batch(payload, DISKS, wire.FLAG_RAW_BODY, direct)
    assert decoded.manifest == enc.manifest and decoded.count == 3
    if direct:
        assert decoded.journal == b""
        assert [(d, b, None if x is None else bytes(x)) for d, b, x in decoded.direct] == [
            (0, 0, TEXT), (0, 1, None), (0, 2, b"x" * BS)]
    else:
        assert len(decoded.journal) == 3 * wire.BATCH_RECORD.size + 2 * BS and not decoded.direct


def test_raw_batch_refusals() -> None:
    payload = wire.encode_batch([(0, 0, TEXT)], wire.RAW).frame[wire.FRAME_HEADER.size:]
    with pytest.raises(ProtocolError, match="raw batch body"):
        wire.decode_batch(payload[:-1], DISKS, wire.FLAG_RAW_BODY)
    with pytest.raises(ProtocolError, match="raw batch body"):
        wire.decode_batch(payload + b"x", DISKS, wire.FLAG_RAW_BODY)
    with pytest.raises(ProtocolError, match="flags"):
        wire.decode_batch(payload, DISKS, 0x2)
    with pytest.raises(ProtocolError, match="corrupt"):  # a raw body without the flag is not zstd
        wire.decode_batch(payload, DISKS, 0)
