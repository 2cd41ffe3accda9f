"""The replication wire format: frames, control messages and block batches.

One TCP stream per source-receiver pair carries length-prefixed frames (see
docs/protocol.md). Everything a peer sends is checked here, and every bad
input becomes a ``ProtocolError`` at this one boundary, before the receiver
writes anything. Functions that touch large buffers (checksums, compression)
are plain functions: callers run them in worker threads.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field as dc_field
from enum import IntEnum
from typing import Any

import trio
import xxhash
import zstandard

from vrfs.bitmap import Bitmap
from vrfs.cycle import (
    MAX_BLOCK_SIZE,
    MAX_DISK_SIZE,
    MAX_DISKS_PER_GROUP,
    MAX_HISTORY,
    MIN_BLOCK_SIZE,
    BadPath,
    CycleHeader,
    DiskEntry,
    check_path,
)

MAGIC = b"VRFS"
VERSION = 1
# magic, version, type, flags, payload length, xxh3-64 of the payload
FRAME_HEADER = struct.Struct(">4sBBHIQ")

MAX_CONTROL_PAYLOAD = 1 << 20  # JSON control messages
MAX_CYCLE_BEGIN_PAYLOAD = 8 << 20  # the namespace of a group with many long paths
MAX_BATCH_RAW = 4 << 20  # uncompressed block bytes in one batch
MAX_BATCH_RECORDS = 65536
MAX_HASHES_PER_FRAME = 65536
# A batch's compressed body can be slightly larger than its raw bytes.
MAX_FRAME_PAYLOAD = 8 << 20

# Batch payload: record count, raw body length; then the records; then the zstd body.
BATCH_HEADER = struct.Struct(">II")
# Frame flag of a BATCH: its body is the raw data itself, not zstd (sent only
# to a receiver whose WELCOME lists FEATURE_RAW_BATCH; every other flag bit of
# a BATCH is refused).
FLAG_RAW_BODY = 0x0001
FEATURE_RAW_BATCH = "raw-batch"
RAW = None  # the "level" of a batch sent without compression
# disk index, block index, kind, data length
BATCH_RECORD = struct.Struct(">HQBI")
KIND_DATA = 0
KIND_ZERO = 1

# Hashes payload: first block index, count; then per block a kind byte and 16 digest bytes.
HASHES_HEADER = struct.Struct(">QI")
HASH_ENTRY = struct.Struct(">B16s")

# Manifest entry: disk index, block index, block digest (16 zero bytes for a zero block).
MANIFEST_ENTRY = struct.Struct(">HQ16s")
ZERO_DIGEST = bytes(16)

# Checksums of payloads above this size are computed in a worker thread.
THREAD_THRESHOLD = 64 << 10


class ProtocolError(Exception):
    """The peer sent something this end must refuse; the connection is closed."""


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    HASHES_REQ = 4
    HASHES = 5
    HASHES_END = 6
    CYCLE_BEGIN = 7
    BATCH = 8
    CYCLE_END = 9
    COMMITTED = 10
    CYCLE_REFUSED = 11


_PAYLOAD_BOUND = {t: MAX_CONTROL_PAYLOAD for t in MsgType}
_PAYLOAD_BOUND[MsgType.CYCLE_BEGIN] = MAX_CYCLE_BEGIN_PAYLOAD
_PAYLOAD_BOUND[MsgType.BATCH] = MAX_FRAME_PAYLOAD
_PAYLOAD_BOUND[MsgType.HASHES] = HASHES_HEADER.size + MAX_HASHES_PER_FRAME * HASH_ENTRY.size


@dataclass(frozen=True)
class Frame:
    type: MsgType
    flags: int
    payload: bytes | bytearray
    # The payload's checksum when the receiver has not checked it yet (only a
    # BATCH received with defer_batch_checksum; decode it with checked_batch).
    unverified: int | None = None


# --- frames -----------------------------------------------------------------


def encode_frame(ftype: MsgType, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > _PAYLOAD_BOUND[ftype]:
        raise ValueError(f"{ftype.name} payload of {len(payload)} bytes exceeds the bound")
    header = FRAME_HEADER.pack(MAGIC, VERSION, ftype, flags, len(payload), xxhash.xxh3_64_intdigest(payload))
    return header + payload


def encode_frame_parts(ftype: MsgType, parts: list[bytes | memoryview], flags: int = 0) -> bytes:
    """encode_frame of b"".join(parts), with one copy of the parts instead of two."""
    length = sum(len(p) for p in parts)
    if length > _PAYLOAD_BOUND[ftype]:
        raise ValueError(f"{ftype.name} payload of {length} bytes exceeds the bound")
    checksum = xxhash.xxh3_64()
    for p in parts:
        checksum.update(p)
    return b"".join([FRAME_HEADER.pack(MAGIC, VERSION, ftype, flags, length, checksum.intdigest()), *parts])


def parse_frame_header(raw: bytes) -> tuple[MsgType, int, int, int]:
    """Check a frame header; returns (type, flags, payload length, checksum)."""
    magic, version, ftype, flags, length, checksum = FRAME_HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a vrfs peer")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this end speaks {VERSION})")
    try:
        mtype = MsgType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    if length > _PAYLOAD_BOUND[mtype]:
        raise ProtocolError(f"{mtype.name} frame of {length} bytes exceeds the bound of {_PAYLOAD_BOUND[mtype]}")
    return mtype, flags, length, checksum


def verify_checksum(payload: bytes | bytearray, checksum: int) -> None:
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise ProtocolError("frame checksum mismatch")


class FrameStream:
    """Frames over a trio byte stream. Receive errors are ProtocolError; a
    clean end of stream between frames is ``None``."""

    def __init__(self, stream: trio.abc.Stream, limiter: trio.CapacityLimiter, *, frame_timeout: float = 120.0):
        self.stream = stream
        self.limiter = limiter
        self.frame_timeout = frame_timeout  # once a frame has started, the rest must arrive in this time
        self.bytes_sent = 0
        self._buf = bytearray()

    async def _fill(self, n: int, *, started: bool) -> bool:
        while len(self._buf) < n:
            try:
                chunk = await self.stream.receive_some(max(n - len(self._buf), 256 << 10))
            except trio.BrokenResourceError as exc:
                raise ProtocolError(f"connection broken: {exc.__cause__ or exc}") from exc
            if not chunk:
                if not started and not self._buf:
                    return False
                raise ProtocolError("stream truncated in the middle of a frame")
            self._buf += chunk
            started = True
        return True

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:  # one copy (a slice of the bytearray would be two)
            out = bytes(view[:n])
        del self._buf[:n]
        return out

    async def _payload(self, length: int) -> bytes | bytearray:
        """A payload of ``length`` bytes (already bounded by its header). A large
        one is received into a buffer of its size: what the stream can put
        there directly (vrfs/tls.py decrypts into it) costs no copy, the rest
        one, instead of passing through the read buffer."""
        if length <= max(len(self._buf), THREAD_THRESHOLD):
            await self._fill(length, started=True)
            return self._take(length)
        out = bytearray(length)
        at = len(self._buf)
        out[:at] = self._buf
        self._buf.clear()
        receive_into = getattr(self.stream, "receive_into", None)
        with memoryview(out) as view:
            while at < length:
                try:
                    if receive_into is not None:
                        got = await receive_into(view[at:])
                    else:
                        chunk = await self.stream.receive_some(length - at)
                        got = len(chunk)
                        view[at:at + got] = chunk
                except trio.BrokenResourceError as exc:
                    raise ProtocolError(f"connection broken: {exc.__cause__ or exc}") from exc
                if not got:
                    raise ProtocolError("stream truncated in the middle of a frame")
                at += got
        return out

    async def receive(self, *, defer_batch_checksum: bool = False) -> Frame | None:
        if not await self._fill(1, started=False):
            return None
        with trio.move_on_after(self.frame_timeout) as scope:
            await self._fill(FRAME_HEADER.size, started=True)
            mtype, flags, length, checksum = parse_frame_header(self._take(FRAME_HEADER.size))
            payload = await self._payload(length)
        if scope.cancelled_caught:
            raise ProtocolError(f"frame not completed within {self.frame_timeout:g} s")
        if mtype == MsgType.BATCH and defer_batch_checksum:
            return Frame(mtype, flags, payload, unverified=checksum)
        if length > THREAD_THRESHOLD:
            await trio.to_thread.run_sync(verify_checksum, payload, checksum, limiter=self.limiter)
        else:
            verify_checksum(payload, checksum)
        return Frame(mtype, flags, payload)

    async def receive_expect(self, *types: MsgType, defer_batch_checksum: bool = False) -> Frame:
        """The next frame, which must be of one of ``types``. With
        ``defer_batch_checksum`` a BATCH frame comes with its checksum
        unchecked (Frame.unverified): the caller checks it (checked_batch)
        in the worker thread that decodes it, one hand-off instead of two."""
        frame = await self.receive(defer_batch_checksum=defer_batch_checksum)
        if frame is None:
            raise ProtocolError("connection closed by peer")
        if frame.type not in types:
            if frame.type == MsgType.ERROR and MsgType.ERROR not in types:
                raise ProtocolError(f"peer reported: {decode_error(frame.payload)}")
            wanted = " or ".join(t.name for t in types)
            raise ProtocolError(f"expected {wanted}, got {frame.type.name}")
        return frame

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.bytes_sent += len(data)

    async def send(self, ftype: MsgType, payload: bytes) -> None:
        if len(payload) > THREAD_THRESHOLD:
            data = await trio.to_thread.run_sync(encode_frame, ftype, payload, limiter=self.limiter)
        else:
            data = encode_frame(ftype, payload)
        await self.send_raw(data)

    async def send_control(self, ftype: MsgType, message: dict[str, Any]) -> None:
        await self.send(ftype, encode_control(message))


# --- control messages -------------------------------------------------------


def encode_control(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


# Values a control message may hold: the largest legitimate one is a
# CYCLE_BEGIN of MAX_DISKS_PER_GROUP disks, each an object of a few fields and
# a history of up to MAX_HISTORY generations. Counted before parsing: 8 MiB of
# `[{},{},…]` would otherwise become 200 MiB of Python objects.
MAX_CONTROL_VALUES = MAX_DISKS_PER_GROUP * (MAX_HISTORY + 16) + 1024
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_STRUCTURE = (b",", b":", b"[", b"{")


def _values_bound(payload: bytes | bytearray) -> None:
    """Refuse a control message with more values than MAX_CONTROL_VALUES
    (commas, colons and openings outside strings), keeping what parsing it
    allocates within a small multiple of its size."""
    if sum(payload.count(c) for c in _STRUCTURE) <= MAX_CONTROL_VALUES:
        return  # the common case: not even counting inside strings reaches the bound
    skeleton = _JSON_STRING.sub(b"", payload)
    if sum(skeleton.count(c) for c in _STRUCTURE) > MAX_CONTROL_VALUES:
        raise ProtocolError(f"control message holds more than {MAX_CONTROL_VALUES} values")


def decode_control(payload: bytes | bytearray) -> dict[str, Any]:
    _values_bound(payload)
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    except RecursionError:  # absurd nesting
        raise ProtocolError("control message nests too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control message is not a JSON object")
    return obj


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A required field of a control message, of the given type (bool is never an int)."""
    if name not in obj:
        raise ProtocolError(f"control message lacks field {name!r}")
    value = obj[name]
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} has the wrong type")
    return value


def int_field(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    value = field(obj, name, int)
    if not low <= value <= high:
        raise ProtocolError(f"field {name!r} = {value} is outside {low}..{high}")
    return value


def decode_error(payload: bytes | bytearray) -> str:
    try:
        return str(decode_control(payload).get("message", "unspecified error"))[:1000]
    except ProtocolError:
        return "unreadable error message"


def check_name(name: Any, what: str = "name") -> str:
    """A source or group name: one path component that cannot leave a directory."""
    if not isinstance(name, str) or "/" in name:
        raise ProtocolError(f"bad {what} {name!r}: must be one path component")
    try:
        check_path(name)
    except BadPath as exc:
        raise ProtocolError(f"bad {what}: {exc}") from None
    return name


def decode_disk_id(text: Any) -> bytes:
    if not isinstance(text, str) or len(text) != 32:
        raise ProtocolError("disk_id must be 32 hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProtocolError("disk_id must be 32 hex digits") from None


MAX_BITMAP_TEXT = MAX_CONTROL_PAYLOAD - 1024


def encode_bitmap(bits: bytes) -> str:
    return base64.b64encode(zlib.compress(bits)).decode()


def decode_bitmap(text: str) -> Bitmap:
    """A block bitmap sent as base64 of zlib (a 2 TiB disk's 4 MiB bitmap of few changes is small)."""
    if len(text) > MAX_BITMAP_TEXT:
        raise ProtocolError("bitmap too large")
    try:
        z = zlib.decompressobj()
        raw = z.decompress(base64.b64decode(text, validate=True), 64 << 20)
        if z.unconsumed_tail:
            raise ProtocolError("bitmap decompresses beyond its bound")
    except (ValueError, zlib.error) as exc:
        raise ProtocolError(f"bad bitmap: {exc}") from None
    return Bitmap(raw)


def disk_ids(value: Any) -> set[bytes]:
    """A list of disk ids (resync requests); a missing field is an empty list."""
    if value is None:
        return set()
    if not isinstance(value, list) or len(value) > MAX_DISKS_PER_GROUP:
        raise ProtocolError("a list of disk ids has the wrong type or length")
    return {decode_disk_id(v) for v in value}


def disk_to_json(disk: DiskEntry) -> dict[str, Any]:
    obj: dict[str, Any] = {"disk_id": disk.disk_id.hex(), "path": disk.path, "size": disk.size,
                           "block_size": disk.block_size}
    if disk.history:
        obj["history"] = list(disk.history)
    return obj


def _history(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_HISTORY or not all(
            isinstance(g, str) and 0 < len(g) <= 64 and g.isalnum() for g in value):
        raise ProtocolError("bad disk history")
    return tuple(value)


def disk_from_json(obj: Any, group: str) -> DiskEntry:
    if not isinstance(obj, dict):
        raise ProtocolError("disk entry is not an object")
    path = field(obj, "path", str)
    try:
        check_path(path, group)
    except BadPath as exc:
        raise ProtocolError(f"bad path: {exc}") from None
    block_size = int_field(obj, "block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
    if block_size & (block_size - 1):
        raise ProtocolError(f"block size {block_size} is not a power of two")
    return DiskEntry(
        disk_id=decode_disk_id(obj.get("disk_id")),
        path=path,
        size=int_field(obj, "size", 0, MAX_DISK_SIZE),
        block_size=block_size,
        history=_history(obj.get("history")),
    )


MAX_BASIS_LENGTH = 256


def header_to_json(header: CycleHeader) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "group": header.group,
        "cycle_id": header.cycle_id,
        "cut_time": header.cut_time,
        "disks": [disk_to_json(d) for d in header.disks],
    }
    if header.full_sync:
        obj["full_sync"] = {disk_id.hex(): basis for disk_id, basis in header.full_sync.items()}
    return obj


def basis_field(value: Any) -> str | None:
    """A full-sync basis token: None (no copy) or a short string the receiver made."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_BASIS_LENGTH or "\0" in value:
        raise ProtocolError("bad full-sync basis")
    return value


def header_from_json(obj: dict[str, Any]) -> CycleHeader:
    group = check_name(field(obj, "group", str), "group")
    cut_time = field(obj, "cut_time", (int, float))
    if not math.isfinite(cut_time):
        raise ProtocolError("cut_time is not finite")
    raw_disks = field(obj, "disks", list)
    if len(raw_disks) > MAX_DISKS_PER_GROUP:
        raise ProtocolError(f"{len(raw_disks)} disks in one group exceed the bound of {MAX_DISKS_PER_GROUP}")
    disks = tuple(disk_from_json(d, group) for d in raw_disks)
    ids = {d.disk_id for d in disks}
    paths = {d.path for d in disks}
    if len(ids) != len(disks) or len(paths) != len(disks):
        raise ProtocolError("duplicate disk_id or path in the cycle header")
    for path in paths:  # a disk cannot also be a directory of another disk
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise ProtocolError(f"path {path!r} lies under another disk")
    raw_full = obj.get("full_sync", {})
    if not isinstance(raw_full, dict):
        raise ProtocolError("field 'full_sync' has the wrong type")
    full_sync = {}
    for key, basis in raw_full.items():
        disk_id = decode_disk_id(key)
        if disk_id not in ids:
            raise ProtocolError("full_sync names a disk that is not in the cycle")
        full_sync[disk_id] = basis_field(basis)
    return CycleHeader(group=group, cycle_id=int_field(obj, "cycle_id", 0, (1 << 63) - 1),
                       cut_time=float(cut_time), disks=disks, full_sync=full_sync)


# --- block batches ----------------------------------------------------------

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects must not be shared between threads.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


_ZEROS: dict[int, bytes] = {}  # zeros by length, for is_zero (block sizes, the last blocks of disks)


def is_zero(data: bytes | memoryview) -> bool:
    """Whether a block is all zeros: a memcmp against zeros, which stops at
    the first non-zero byte (bytes.count(0) scans at a quarter of its speed)."""
    n = len(data)
    zeros = _ZEROS.get(n)
    if zeros is None:
        if len(_ZEROS) >= 64 or n > MAX_BLOCK_SIZE:
            return bytes(data).count(0) == n
        zeros = _ZEROS.setdefault(n, bytes(n))
    # A memoryview (a block of a run) compares element by element, 30 times
    # slower than memcmp; startswith of zeros of its very length is memcmp, without a copy.
    return zeros.startswith(data) if isinstance(data, memoryview) else data == zeros


def block_length(disk: DiskEntry, index: int) -> int:
    return min(disk.block_size, disk.size - index * disk.block_size)


def block_digest(data: bytes | memoryview | None) -> bytes:
    return ZERO_DIGEST if data is None else xxhash.xxh3_128_digest(data)


@dataclass
class EncodedBatch:
    frame: bytes  # a whole BATCH frame, ready to send
    manifest: bytes  # MANIFEST_ENTRY records of its blocks, in order
    count: int
    level: int | None = 1  # the zstd level used; None: the body went raw (FLAG_RAW_BODY)
    raw_bytes: int = 0  # data bytes before compression
    body_bytes: int = 0  # the body as sent
    seconds: float = 0.0  # spent compressing (the sample test included)
    sample_ratio: float | None = None  # compressed/raw of the sample, when one was taken


SAMPLE_SLICE = 4096  # bytes taken from a block for the compressibility sample
SAMPLE_BLOCKS = 8  # blocks sampled per batch
INCOMPRESSIBLE = 0.95  # a sample that keeps more than this of its size is not worth compressing


def sample_ratio(body: list[Block]) -> float:
    """Compressed/raw size of a small sample of a batch's data blocks at the
    cheapest level: 4 KiB from up to 8 blocks spread over the batch (about
    1.5 % of a 2 MiB batch)."""
    step = max(1, len(body) // SAMPLE_BLOCKS)
    picked = [b[len(b) // 2:len(b) // 2 + SAMPLE_SLICE] for b in body[::step][:SAMPLE_BLOCKS]]
    sample = b"".join(picked)
    if not sample:
        return 1.0
    return len(_compressor(1).compress(sample)) / len(sample)


Block = bytes | memoryview


def split_runs(runs: list[tuple[int, int, Block | None]],
               block_sizes: list[int] | None) -> Iterator[tuple[int, int, Block | None]]:
    """The blocks of ``runs``: (disk index, first block, data of consecutive
    blocks, or None for one zero block), each data cut into blocks of its
    disk's size (``block_sizes`` by disk index) as views, without a copy.
    Without ``block_sizes`` every item is one block."""
    for disk_index, first, data in runs:
        if data is None or block_sizes is None:
            yield disk_index, first, data
            continue
        bs = block_sizes[disk_index]
        if len(data) <= bs:
            yield disk_index, first, data
            continue
        view = memoryview(data)
        for k, at in enumerate(range(0, len(view), bs)):
            yield disk_index, first + k, view[at:at + bs]


def encode_batch(blocks: list[tuple[int, int, Block | None]], level: int | None,
                 skip_incompressible: bool = False, block_sizes: list[int] | None = None) -> EncodedBatch:
    """Build a BATCH frame; all-zero blocks become zero records without payload.

    ``blocks`` are single blocks, or with ``block_sizes`` (by disk index) runs
    of consecutive blocks (split_runs): a worker thread cuts them up, not the
    caller's loop. ``level`` None sends the body raw (FLAG_RAW_BODY; only to
    a receiver that offers FEATURE_RAW_BATCH). With ``skip_incompressible``,
    a body whose sample does not compress (INCOMPRESSIBLE) goes raw whatever
    the level."""
    records = [BATCH_HEADER.pack(0, 0)]
    manifest = []
    body: list[Block] = []
    raw = 0
    for disk_index, block_index, data in split_runs(blocks, block_sizes):
        if data is not None and is_zero(data):
            data = None
        if data is None:
            records.append(BATCH_RECORD.pack(disk_index, block_index, KIND_ZERO, 0))
        else:
            records.append(BATCH_RECORD.pack(disk_index, block_index, KIND_DATA, len(data)))
            body.append(data)
            raw += len(data)
        manifest.append(MANIFEST_ENTRY.pack(disk_index, block_index, block_digest(data)))
    records[0] = BATCH_HEADER.pack(len(manifest), raw)
    started = time.perf_counter()
    ratio = None
    if level is not None and skip_incompressible and raw:
        ratio = sample_ratio(body)
        if ratio > INCOMPRESSIBLE:
            level = None
    parts: list[bytes | memoryview] = [*records]
    if level is None:
        flags = FLAG_RAW_BODY
        parts += body
    else:
        flags = 0
        parts.append(_compressor(level).compress(b"".join(body)))
    seconds = time.perf_counter() - started
    frame = encode_frame_parts(MsgType.BATCH, parts, flags)
    body_bytes = len(frame) - FRAME_HEADER.size - sum(len(r) for r in records)
    return EncodedBatch(frame, b"".join(manifest), len(manifest), level, raw, body_bytes, seconds, ratio)


@dataclass
class DecodedBatch:
    journal: bytes  # BATCH_RECORD + data per block, as the receiver's journal stores them
    manifest: bytes
    count: int
    # Records of the disks decode_batch was told to keep apart (``direct``):
    # (disk index, block index, data or None for a zero block), in order.
    direct: list[tuple[int, int, memoryview | None]] = dc_field(default_factory=list)


def _bounded_decompress(data: bytes | bytearray, size: int) -> bytes:
    """Decompress at most ``size`` bytes: a bomb is refused without allocating past the bound."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    try:
        while len(out) <= size:
            chunk = reader.read(size + 1 - len(out))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"corrupt compressed batch: {exc}") from None
    if len(out) != size:
        raise ProtocolError(f"batch decompresses to {'more' if len(out) > size else len(out)} bytes, declared {size}")
    return bytes(out)


def decode_batch(payload: bytes | bytearray, disks: tuple[DiskEntry, ...], flags: int = 0,
                 direct: frozenset[int] = frozenset()) -> DecodedBatch:
    """Check a BATCH payload (and its frame's ``flags``) against the cycle's
    disks and turn it into journal records; the records of the disks whose
    index is in ``direct`` are returned apart, in ``DecodedBatch.direct``."""
    if flags & ~FLAG_RAW_BODY:
        raise ProtocolError(f"unknown BATCH flags {flags:#x}")
    if len(payload) < BATCH_HEADER.size:
        raise ProtocolError("batch shorter than its header")
    count, raw = BATCH_HEADER.unpack_from(payload)
    if count > MAX_BATCH_RECORDS or raw > MAX_BATCH_RAW:
        raise ProtocolError(f"batch of {count} records / {raw} bytes exceeds the bounds")
    body_at = BATCH_HEADER.size + count * BATCH_RECORD.size
    if body_at > len(payload):
        raise ProtocolError("batch records truncated")
    records = []
    total = 0
    for i in range(count):
        disk_index, block_index, kind, length = BATCH_RECORD.unpack_from(
            payload, BATCH_HEADER.size + i * BATCH_RECORD.size)
        if disk_index >= len(disks):
            raise ProtocolError(f"block record names disk {disk_index}, the cycle has {len(disks)}")
        disk = disks[disk_index]
        if block_index >= disk.block_count:
            raise ProtocolError(f"block {block_index} is beyond the end of {disk.path!r} ({disk.block_count} blocks)")
        if kind == KIND_DATA:
            if length != block_length(disk, block_index):
                raise ProtocolError(f"block {block_index} of {disk.path!r} has length {length}, "
                                    f"expected {block_length(disk, block_index)}")
        elif kind == KIND_ZERO:
            if length:
                raise ProtocolError("zero block record with a length")
        else:
            raise ProtocolError(f"unknown block kind {kind}")
        records.append((disk_index, block_index, kind, length))
        total += length
    if total != raw:
        raise ProtocolError(f"block lengths add up to {total}, batch declares {raw}")
    if flags & FLAG_RAW_BODY:
        if len(payload) - body_at != raw:
            raise ProtocolError(f"raw batch body of {len(payload) - body_at} bytes, declared {raw}")
        body = memoryview(payload)[body_at:]
    else:
        body = memoryview(_bounded_decompress(payload[body_at:], raw) if raw else b"")
        if not raw and len(payload) > body_at:
            # An empty body is still a zstd frame; refuse anything that would decompress to more.
            _bounded_decompress(payload[body_at:], 0)
    journal: list[bytes | memoryview] = []
    manifest = []
    apart: list[tuple[int, int, memoryview | None]] = []
    at = 0
    for disk_index, block_index, kind, length in records:
        data = body[at:at + length] if kind == KIND_DATA else None
        at += length
        if disk_index in direct:
            apart.append((disk_index, block_index, data))
        else:
            journal.append(BATCH_RECORD.pack(disk_index, block_index, kind, length))
            if data is not None:
                journal.append(data)
        manifest.append(MANIFEST_ENTRY.pack(disk_index, block_index,
                                            ZERO_DIGEST if data is None else xxhash.xxh3_128_digest(data)))
    return DecodedBatch(b"".join(journal), b"".join(manifest), count, apart)


def checked_batch(frame: Frame, disks: tuple[DiskEntry, ...], direct: frozenset[int] = frozenset()) -> DecodedBatch:
    """decode_batch of a BATCH frame, after its checksum when that is still unchecked."""
    if frame.unverified is not None:
        verify_checksum(frame.payload, frame.unverified)
    return decode_batch(frame.payload, disks, frame.flags, direct)


# --- block hashes (full sync) -----------------------------------------------


def encode_hashes(first: int, digests: list[bytes | None]) -> bytes:
    parts = [HASHES_HEADER.pack(first, len(digests))]
    for d in digests:
        parts.append(HASH_ENTRY.pack(0, ZERO_DIGEST) if d is None else HASH_ENTRY.pack(1, d))
    return b"".join(parts)


def decode_hashes(payload: bytes | bytearray, expect_first: int) -> list[bytes | None]:
    if len(payload) < HASHES_HEADER.size:
        raise ProtocolError("hashes frame shorter than its header")
    first, count = HASHES_HEADER.unpack_from(payload)
    if first != expect_first:
        raise ProtocolError(f"hashes start at block {first}, expected {expect_first}")
    if len(payload) != HASHES_HEADER.size + count * HASH_ENTRY.size:
        raise ProtocolError("hashes frame length does not match its count")
    out: list[bytes | None] = []
    for i in range(count):
        kind, digest = HASH_ENTRY.unpack_from(payload, HASHES_HEADER.size + i * HASH_ENTRY.size)
        out.append(None if kind == 0 else digest)
    return out
