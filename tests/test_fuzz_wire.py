"""Fuzzing the wire format's decoders with hypothesis: whatever a peer sends,
they raise nothing but ProtocolError, and a batch never decodes to more than
its declared, bounded size. A short run by default; `pytest -m slow` runs
the long one (VRFS_FUZZ_EXAMPLES sets the count)."""

from __future__ import annotations

import json
import os

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrfs import wire
from vrfs.cycle import DiskEntry
from vrfs.wire import ProtocolError

SHORT, LONG = 200, int(os.environ.get("VRFS_FUZZ_EXAMPLES", "20000"))
DISKS = (DiskEntry(b"\1" * 16, "vm1/a.raw", 4 * 65536 + 100, 65536), DiskEntry(b"\2" * 16, "vm1/b", 4096, 4096))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)
disk_objects = st.fixed_dictionaries({}, optional={
    "disk_id": st.one_of(st.text(max_size=40), st.just("01" * 16), json_values),
    "path": st.one_of(st.sampled_from(["vm1/a", "vm1/../x", "/etc", "vm1/a\0b", ".vrfs/x", "vm1"]), st.text()),
    "size": st.one_of(st.integers(-5, 1 << 62), json_values),
    "block_size": st.one_of(st.sampled_from([4096, 65536, 1000, 0, 1 << 21]), json_values),
    "history": st.one_of(st.lists(st.text(max_size=70), max_size=70), json_values)})
headers = st.fixed_dictionaries({}, optional={
    "group": st.one_of(st.sampled_from(["vm1", "..", ".vrfs", "a/b", ""]), st.text()),
    "cycle_id": st.one_of(st.integers(-1, 1 << 64), json_values),
    "cut_time": st.one_of(st.floats(allow_nan=True, allow_infinity=True), json_values),
    "disks": st.one_of(st.lists(disk_objects, max_size=4), json_values),
    "full_sync": st.one_of(st.dictionaries(st.text(max_size=40), st.one_of(st.none(), st.text()), max_size=3),
                           json_values)})


def only_protocol_errors(fn, *args) -> None:  # noqa: ANN001
    try:
        fn(*args)
    except ProtocolError:
        pass


def short(test):  # noqa: ANN001, ANN201
    return settings(max_examples=SHORT, deadline=None, suppress_health_check=[HealthCheck.too_slow])(test)


@short
@given(st.binary(min_size=wire.FRAME_HEADER.size, max_size=wire.FRAME_HEADER.size))
def test_frame_headers(raw: bytes) -> None:
    only_protocol_errors(wire.parse_frame_header, raw)


@short
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_control_messages(payload: bytes) -> None:
    only_protocol_errors(wire.decode_control, payload)
    only_protocol_errors(wire.decode_error, payload)


@short
@given(headers)
def test_cycle_headers(obj: dict) -> None:
    only_protocol_errors(wire.header_from_json, obj)


@short
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 40), st.integers(0, 3), st.integers(0, 1 << 20)),
                max_size=8), st.binary(max_size=2000), st.integers(0, 1 << 23))
def test_batches(records: list, body: bytes, raw: int) -> None:
    payload = wire.BATCH_HEADER.pack(len(records), raw) + b"".join(
        wire.BATCH_RECORD.pack(*r) for r in records) + body
    try:
        batch = wire.decode_batch(payload, DISKS)
    except ProtocolError:
        return
    assert len(batch.journal) <= wire.MAX_BATCH_RAW + len(records) * wire.BATCH_RECORD.size


@short
@given(st.binary(max_size=500), st.integers(0, 10))
def test_hashes(payload: bytes, first: int) -> None:
    only_protocol_errors(wire.decode_hashes, payload, first)


@short
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: __import__("base64").b64encode(b).decode())))
def test_bitmaps(text: str) -> None:
    only_protocol_errors(wire.decode_bitmap, text)


@short
@given(st.binary(max_size=400))
def test_frame_stream(data: bytes) -> None:
    """Arbitrary bytes on the stream: frames, a clean end, or ProtocolError."""
    async def main() -> None:
        left, right = trio.testing.memory_stream_pair()
        frames = wire.FrameStream(right, trio.CapacityLimiter(1), frame_timeout=1)
        await left.send_all(data)
        await left.send_eof()
        try:
            while await frames.receive() is not None:
                pass
        except ProtocolError:
            pass
    trio.run(main)


@pytest.mark.slow
@settings(max_examples=LONG, deadline=None, suppress_health_check=list(HealthCheck))
@given(headers, st.binary(max_size=600), st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 40), st.integers(0, 3), st.integers(0, 1 << 20)), max_size=8))
def test_long_run_of_every_decoder(obj: dict, blob: bytes, records: list) -> None:
    only_protocol_errors(wire.header_from_json, obj)
    only_protocol_errors(wire.decode_control, blob)
    only_protocol_errors(wire.decode_hashes, blob, 0)
    if len(blob) >= wire.FRAME_HEADER.size:
        only_protocol_errors(wire.parse_frame_header, blob[:wire.FRAME_HEADER.size])
    payload = wire.BATCH_HEADER.pack(len(records), len(blob)) + b"".join(
        wire.BATCH_RECORD.pack(*r) for r in records) + blob
    only_protocol_errors(wire.decode_batch, payload, DISKS)
