"""The source end of the replication link: what the shipper calls.

A ``Link`` is one TCP connection to a ``vrfs serve`` receiver. Every failure
(refused or reset connection, protocol error, an error reported by the
receiver, a timeout) is raised as ``LinkError``; after one, the link is
unusable and the caller connects again. Calls on one link are serialized.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field as dc_field

import trio
import xxhash

from vrfs import __version__
from vrfs.nursery import first_failure
from vrfs.sockets import UNLIMITED_RATE, buffer_for, keep_unsent, rtt_of, tune_socket
from vrfs.bitmap import Bitmap
from vrfs.bwlimit import RateLimitedStream, TokenBucket
from vrfs.compression import CompressionPolicy
from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.tls import Authenticated, ClientTls, close
from vrfs.trust import TrustError
from vrfs.wire import (
    FEATURE_RAW_BATCH,
    MAX_BATCH_RECORDS,
    Block,
    EncodedBatch,
    FrameStream,
    MsgType,
    ProtocolError,
    basis_field,
    check_name,
    decode_bitmap,
    decode_control,
    decode_error,
    decode_hashes,
    disk_ids,
    disk_to_json,
    encode_batch,
    field,
    header_to_json,
    int_field,
)

BATCH_TARGET = 2 << 20  # raw bytes per batch; stays below wire.MAX_BATCH_RAW with one more block
PIPELINE_DEPTH = 8  # batches compressed or queued ahead of the socket
CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 600.0  # the receiver applies a whole cycle before it answers


class LinkError(Exception):
    """The link failed; it must be reconnected."""


class CycleRefused(Exception):
    """The receiver refused one cycle of one group; the link stays usable.

    ``resync`` names the disks whose replica the receiver cannot build on
    (missing, damaged, or not the copy the source compared against): they
    need a full sync. ``point`` is the group's committed point there."""

    def __init__(self, message: str, resync: set[bytes], point: int | None, fenced: bool = False,
                 diverged: bool = False) -> None:
        super().__init__(message)
        self.resync = resync
        self.point = point
        self.fenced = fenced or diverged  # failed over at the DR site, or split brain: ask rarely
        self.diverged = diverged


@dataclass(frozen=True)
class Hashes:
    """The receiver's view of one disk for a comparison: per-block digests of
    [first, first + len(digests)) (None for zero blocks and holes), the copy's
    size, and the basis token that names exactly which copy was hashed."""

    digests: list[bytes | None]
    size: int
    basis: str
    # Instead of digests: the blocks that changed at the DR site's copy since
    # the point the source's disk started from (a reprotect's seed).
    dirty: Bitmap | None = None


log = logging.getLogger("vrfs.link")


async def _open_socket(host: str, port: int, congestion: str | None,
                       buffer: int | None = None) -> tuple[trio.SocketStream, int]:
    # The socket is built by hand so its buffers are sized before the SYN
    # (the window scale is fixed at connection setup).
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        granted, _ = tune_socket(sock, congestion, buffer)
        try:
            await sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        stream = trio.SocketStream(sock)
        keep_unsent(sock)  # after trio.SocketStream(), which sets its own
        return stream, granted
    raise last or OSError(f"no address for {host}")


@dataclass
class _Pending:
    done: trio.Event = dc_field(default_factory=trio.Event)
    batch: EncodedBatch | None = None


class Link:
    def __init__(self, frames: FrameStream, store_id: str, points: dict[str, int], zstd_level: int,
                 resync: dict[str, set[bytes]] | None = None, security: Authenticated | None = None,
                 features: frozenset[str] = frozenset()):
        self._frames = frames
        self.security = security or Authenticated(insecure=True)
        self.store_id = store_id
        self.points = points
        self.resync = resync or {}  # group -> disks whose replica the receiver found missing or damaged
        self.zstd_level = zstd_level  # the ceiling: batches go at this level or cheaper (vrfs/compression.py)
        self.features = features  # what the receiver offers beyond the base protocol (WELCOME)
        # Compressors run beside the trio thread that feeds the socket (and
        # encrypts): on a machine of n cores, at most n - 1 of them compress at full speed.
        compressors = min(int(frames.limiter.total_tokens), max(1, (os.cpu_count() or 1) - 1))
        self.compression = CompressionPolicy(zstd_level, compressors, raw_allowed=FEATURE_RAW_BATCH in features)
        self._lock = trio.Lock()
        self._broken: str | None = None

    @classmethod
    async def connect(cls, host: str, port: int, source_name: str, *, tls: ClientTls, zstd_level: int = 1,
                      congestion: str | None = "cubic", threads: int = 2,
                      bwlimit: TokenBucket | None = None) -> Link:
        """Connect, authenticate both ends (unless `tls` is insecure), say HELLO.
        With ``bwlimit`` everything sent, TLS included, passes that bucket."""
        try:
            check_name(source_name, "source name")
        except ProtocolError as exc:
            raise LinkError(str(exc)) from None
        limiter = trio.CapacityLimiter(threads)
        stream: trio.abc.Stream | None = None
        handshook = False
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                peak = bwlimit.schedule.peak() if bwlimit is not None else None
                sock_stream, granted = await _open_socket(host, port, congestion, buffer_for(peak))
                stream = sock_stream
                if bwlimit is not None and bwlimit.schedule.limited:
                    stream = RateLimitedStream(sock_stream, bwlimit)
                stream, security = await tls.wrap(stream)
                _check_buffer(sock_stream.socket, granted, peak)
                handshook = True
                frames = FrameStream(stream, limiter)
                await frames.send_control(MsgType.HELLO, {"source": source_name, "software": f"vrfs {__version__}"})
                frame = await frames.receive_expect(MsgType.WELCOME)
                welcome = decode_control(frame.payload)
                store_id = field(welcome, "store_id", str)
                raw_points = field(welcome, "points", dict)
                points = {}
                for group, value in raw_points.items():
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise ProtocolError("bad point in WELCOME")
                    points[check_name(group, "group")] = value
                raw_resync = welcome.get("resync", {})
                if not isinstance(raw_resync, dict):
                    raise ProtocolError("bad resync in WELCOME")
                resync = {check_name(g, "group"): disk_ids(ids) for g, ids in raw_resync.items()}
                raw_features = welcome.get("features", [])
                features = frozenset(f for f in raw_features if isinstance(f, str)) \
                    if isinstance(raw_features, list) else frozenset()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ProtocolError, TrustError) as exc:
            if stream is not None:
                await close(stream)
            why = tls.explain(exc, handshook) or _describe(exc)
            if tls.dir is None and isinstance(exc, (ProtocolError, trio.BrokenResourceError)):
                why += " (this source runs with --insecure: does the receiver require TLS?)"
            raise LinkError(f"cannot connect to {host}:{port}: {why}") from exc
        return cls(frames, store_id, points, zstd_level, resync, security, features)

    @property
    def bytes_sent(self) -> int:
        return self._frames.bytes_sent

    async def aclose(self) -> None:
        self._broken = self._broken or "closed"
        await close(self._frames.stream)

    def _usable(self) -> None:
        if self._broken:
            raise LinkError(f"link is unusable: {self._broken}")

    async def _fail(self, exc: BaseException, doing: str) -> LinkError:
        self._broken = f"{doing}: {_describe(exc)}"
        await close(self._frames.stream)
        return LinkError(self._broken)

    async def check_alive(self, wait: float = 0.05) -> None:
        """Between calls the receiver says nothing; if it closed the connection
        (a restart, a crash) find out now, not at the next cycle, so that the
        handshake of a new connection reports what changed there."""
        async with self._lock:
            self._usable()
            try:
                with trio.move_on_after(wait):
                    frame = await self._frames.receive()
                    if frame is None:
                        raise await self._fail(EOFError("connection closed by the receiver"), "idle")
                    if frame.type == MsgType.ERROR:
                        raise ProtocolError(f"receiver: {decode_error(frame.payload)}")
                    raise ProtocolError(f"unexpected {frame.type.name} between requests")
            except (OSError, trio.BrokenResourceError, ProtocolError) as exc:
                raise await self._fail(exc, "idle") from exc

    async def fetch_hashes(self, group: str, disk: DiskEntry, first: int = 0,
                           count: int | None = None, lineage_point: int | None = None) -> Hashes | None:
        """The receiver's digests of its copy of ``disk``, blocks [first,
        first + count) (all from ``first`` when count is None; fewer where the
        copy ends), or None if the receiver has no copy."""
        request: dict = {"group": group, "disk": disk_to_json(disk)}
        if first or count is not None:
            request["first"] = first
            request["count"] = disk.block_count - first if count is None else count
        if lineage_point is not None:
            request["lineage_point"] = lineage_point
        async with self._lock:
            self._usable()
            try:
                with trio.fail_after(REPLY_TIMEOUT):
                    await self._frames.send_control(MsgType.HASHES_REQ, request)
                    digests: list[bytes | None] = []
                    while True:
                        frame = await self._frames.receive_expect(MsgType.HASHES, MsgType.HASHES_END, MsgType.ERROR)
                        if frame.type == MsgType.ERROR:
                            raise ProtocolError(f"receiver: {decode_error(frame.payload)}")
                        if frame.type == MsgType.HASHES_END:
                            end = decode_control(frame.payload)
                            if not field(end, "present", bool):
                                return None
                            if int_field(end, "blocks", 0, 1 << 40) != len(digests):
                                raise ProtocolError("hash count does not match HASHES_END")
                            basis = basis_field(field(end, "basis", str))
                            assert basis is not None
                            dirty = None
                            if end.get("dirty") is not None:
                                dirty = decode_bitmap(field(end, "dirty", str))
                            return Hashes(digests, int_field(end, "size", 0, 1 << 62), basis, dirty)
                        digests.extend(decode_hashes(frame.payload, first + len(digests)))
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ProtocolError) as exc:
                raise await self._fail(exc, "fetching hashes") from exc
            except BaseException as exc:  # cancelled mid-exchange: the stream is out of step
                await self._fail(exc, "fetching hashes interrupted")
                raise

    async def send_cycle(self, header: CycleHeader, blocks: AsyncIterator[tuple[int, int, Block | None]]) -> float:
        """Stream one cycle and return once the receiver has committed and applied
        it. Returns the seconds from CYCLE_BEGIN to the acknowledgment.

        ``blocks`` yields (disk index, first block, data): data of one or
        more consecutive blocks (whole blocks but a disk's last), or None for
        one zero block. Runs cost this loop a few steps each, not one per block."""
        async with self._lock:
            self._usable()
            try:
                return await self._send_cycle(header, blocks)
            except CycleRefused:
                raise
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ProtocolError) as exc:
                reason = await self._receiver_reason()
                failure: BaseException = ProtocolError(f"receiver: {reason}") if reason else exc
                raise await self._fail(failure, f"sending cycle {header.cycle_id} of {header.group}") from exc
            except BaseException as exc:  # a caller's bad block or a cancellation: the stream is out of step
                await self._fail(exc, "sending interrupted")
                raise

    async def _receiver_reason(self) -> str | None:
        """After a failed send the receiver may have said why before closing."""
        try:
            with trio.move_on_after(2):
                while True:
                    frame = await self._frames.receive()
                    if frame is None:
                        return None
                    if frame.type == MsgType.ERROR:
                        return decode_error(frame.payload)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            pass
        return None

    async def _send_cycle(self, header: CycleHeader, blocks: AsyncIterator[tuple[int, int, Block | None]]) -> float:
        frames = self._frames
        started = trio.current_time()
        await frames.send_control(MsgType.CYCLE_BEGIN, header_to_json(header))
        try:
            count, manifest = await self._stream_blocks(header, blocks)
        except BaseExceptionGroup as group:  # report the one failure that mattered, not the group
            raise first_failure(group) from None
        await frames.send_control(MsgType.CYCLE_END, {"blocks": count, "manifest": manifest})
        with trio.fail_after(REPLY_TIMEOUT):
            frame = await frames.receive_expect(MsgType.COMMITTED, MsgType.CYCLE_REFUSED, MsgType.ERROR)
        if frame.type == MsgType.ERROR:
            raise ProtocolError(f"receiver: {decode_error(frame.payload)}")
        reply = decode_control(frame.payload)
        if frame.type == MsgType.CYCLE_REFUSED:
            if reply.get("group") != header.group or reply.get("cycle_id") != header.cycle_id:
                raise ProtocolError("CYCLE_REFUSED does not match the cycle sent")
            point = reply.get("point")
            if isinstance(point, bool) or not isinstance(point, int) or point < 0:
                point = None
            else:
                self.points[header.group] = point
            raise CycleRefused(str(reply.get("message", "refused"))[:1000], disk_ids(reply.get("resync")), point,
                               reply.get("fenced") is True, reply.get("diverged") is True)
        if reply.get("group") != header.group or reply.get("cycle_id") != header.cycle_id:
            raise ProtocolError("COMMITTED does not match the cycle sent")
        self.points[header.group] = header.cycle_id
        return trio.current_time() - started

    async def _stream_blocks(self, header: CycleHeader,
                             blocks: AsyncIterator[tuple[int, int, Block | None]]) -> tuple[int, str]:
        """Batches are compressed in worker threads while earlier ones are sent;
        an ordered queue of pending batches keeps them in sequence and bounds
        how many are in memory."""
        frames = self._frames
        manifest = xxhash.xxh3_64()
        count = 0
        send_queue, ordered = trio.open_memory_channel[_Pending](PIPELINE_DEPTH)

        policy = self.compression
        skip_incompressible = FEATURE_RAW_BATCH in self.features

        async def encode(pending: _Pending, batch: list[tuple[int, int, Block | None]]) -> None:
            # The level is chosen per batch from what the earlier ones measured.
            encoded = await trio.to_thread.run_sync(encode_batch, batch, policy.choose(), skip_incompressible,
                                                    block_sizes, limiter=frames.limiter)
            policy.encoded(encoded.level, encoded.raw_bytes, encoded.body_bytes, encoded.seconds,
                           encoded.sample_ratio)
            pending.batch = encoded
            pending.done.set()

        async def sender() -> None:
            nonlocal count
            async with ordered:
                async for pending in ordered:
                    await pending.done.wait()
                    assert pending.batch is not None
                    manifest.update(pending.batch.manifest)
                    count += pending.batch.count
                    started = trio.current_time()
                    await frames.send_raw(pending.batch.frame)
                    policy.sent(len(pending.batch.frame), trio.current_time() - started)

        block_sizes = [d.block_size for d in header.disks]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            async with send_queue:
                batch: list[tuple[int, int, Block | None]] = []
                raw = records = 0

                async def flush() -> None:
                    nonlocal batch, raw, records
                    pending = _Pending()
                    nursery.start_soon(encode, pending, batch)
                    await send_queue.send(pending)
                    batch, raw, records = [], 0, 0

                async for disk_index, first, data in blocks:
                    left = _check_run(header, disk_index, first, data)
                    if data is None:
                        batch.append((disk_index, first, None))
                        records += 1
                    bs = block_sizes[disk_index]
                    view = memoryview(data) if data is not None else memoryview(b"")
                    while view:
                        # As much of the run as the batch has room for, in whole blocks (at least one).
                        fits = min(left, MAX_BATCH_RECORDS - records, max(1, -(-(BATCH_TARGET - raw) // bs)))
                        piece = view[:fits * bs]
                        batch.append((disk_index, first, piece))
                        raw += len(piece)
                        records += fits
                        view, first, left = view[fits * bs:], first + fits, left - fits
                        if raw >= BATCH_TARGET or records >= MAX_BATCH_RECORDS:
                            await flush()
                    if records >= MAX_BATCH_RECORDS:
                        await flush()
                if batch:
                    await flush()
        return count, manifest.hexdigest()


def _check_buffer(sock: trio.socket.SocketType, granted: int, rate: float | None) -> None:
    """Log the link's round trip and send buffer; warn when the buffer cannot
    hold the bandwidth-delay product of the limit (or of 1 Gbit/s)."""
    rtt = rtt_of(sock)
    if rtt is None:
        return
    bdp = (rate or UNLIMITED_RATE) * rtt
    log.info("link round trip %.1f ms, send buffer %.1f MiB (bandwidth-delay product %.1f MiB at %s)",
             rtt * 1000, granted / (1 << 20), bdp / (1 << 20),
             f"{rate * 8 / 1e6:g} Mbit/s" if rate else "1 Gbit/s")
    if granted and granted < bdp:
        log.warning("the send buffer (%.1f MiB) is smaller than the bandwidth-delay product (%.1f MiB): "
                    "raise net.core.wmem_max or run as root, or the link will not be full",
                    granted / (1 << 20), bdp / (1 << 20))


def _check_run(header: CycleHeader, disk_index: int, first: int, data: Block | None) -> int:
    """The number of blocks in a run from the shipper: None is one zero block,
    data covers consecutive blocks from ``first``, each of its disk's block
    size but the disk's last, which may be shorter."""
    # A caller's mistake, not a link failure: the receiver would refuse the cycle.
    if not 0 <= disk_index < len(header.disks):
        raise ValueError(f"disk index {disk_index} outside the cycle's {len(header.disks)} disks")
    disk = header.disks[disk_index]
    count = 1 if data is None else max(1, -(-len(data) // disk.block_size))
    if not (0 <= first and first + count <= disk.block_count):
        raise ValueError(f"blocks {first}-{first + count - 1} reach beyond the end of {disk.path}")
    expected = min(count * disk.block_size, disk.size - first * disk.block_size)
    if data is not None and len(data) != expected:
        raise ValueError(f"blocks {first}-{first + count - 1} of {disk.path} have {len(data)} bytes, expected "
                         f"{expected}")
    return count


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return str(exc.__cause__) or type(exc.__cause__).__name__
    return str(exc) or type(exc).__name__
