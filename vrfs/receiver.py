"""The DR end of the replication link: one session per connection.

A session answers HELLO with the store's identity and points, then serves
hash requests (full sync) and cycles. A cycle is staged in a journal, checked
against its manifest, made durable, committed, applied and only then
acknowledged (docs/receiver.md). Anything wrong with what the peer sends ends
that connection alone, with one log line naming the peer and the reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio
import xxhash

from vrfs import __version__, admission
from vrfs.allocator import keep_large_buffers
from vrfs.nursery import first_failure
from vrfs.cycle import CycleHeader, DiskEntry
from vrfs.cycle import MAX_DISKS_PER_GROUP
from vrfs.store import Store, StoreError
from vrfs.store.base import ApplyFailed, Diverged, Fenced, Refusal, hash_blocks
from vrfs.store.journal import Journal
from vrfs.testhooks import crash_point
from vrfs.tls import close
from vrfs.wire import (
    FEATURE_RAW_BATCH,
    MAX_HASHES_PER_FRAME,
    DecodedBatch,
    Frame,
    checked_batch,
    FrameStream,
    MsgType,
    ProtocolError,
    check_name,
    decode_control,
    disk_from_json,
    encode_hashes,
    field,
    header_from_json,
    int_field,
)

log = logging.getLogger("vrfs.receiver")

HANDSHAKE_TIMEOUT = float(os.environ.get("VRFS_HANDSHAKE_TIMEOUT", "30"))
# Inside a cycle the source streams without pause; one that goes silent there
# holds its group, so it is cut off. (Between cycles a source may be idle.)
CYCLE_IDLE_TIMEOUT = float(os.environ.get("VRFS_CYCLE_IDLE_TIMEOUT", "60"))

T = TypeVar("T")

class Receiver:
    def __init__(self, store: Store, *, threads: int = 4):
        keep_large_buffers()  # payloads of 2-4 MiB, one after another (vrfs/allocator.py)
        self.store = store
        self.limiter = trio.CapacityLimiter(threads)
        self._busy: set[tuple[str, str]] = set()  # (source, group) with a cycle (or a failover) in progress
        self._done: dict[tuple[str, str], trio.Event] = {}  # set when a busy group is released
        # For metrics (vrfs/metrics.py), per (source, group): its newest point (id, cut time) and counters.
        self.points: dict[tuple[str, str], tuple[int, float]] = {}
        self.cycles_committed: dict[tuple[str, str], int] = {}
        self.bytes_received: dict[tuple[str, str], int] = {}  # batch payloads staged (compressed, as received)
        self.refusals: dict[tuple[str, str], int] = {}

    def _hold(self, key: tuple[str, str]) -> None:
        self._busy.add(key)
        self._done[key] = trio.Event()

    def _release(self, key: tuple[str, str]) -> None:
        self._busy.discard(key)
        done = self._done.pop(key, None)
        if done is not None:
            done.set()

    def _released(self, key: tuple[str, str]) -> trio.Event:
        done = self._done.get(key)  # not `or`: a trio.Event refuses to be a bool
        return done if done is not None else trio.Event()

    async def holding(self, source: str, group: str, fn: Callable[..., T], *args: Any, wait: float = 120.0) -> T:
        """Run ``fn`` in a worker thread while no cycle of the group can be
        received (a failover, a test failover): a cycle in progress finishes
        first; one that arrives meanwhile is refused and comes again."""
        key = (source, group)
        with trio.fail_after(wait):
            while key in self._busy:
                await self._released(key).wait()
        self._hold(key)
        try:
            return await self._run(fn, *args)
        finally:
            self._release(key)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def recover(self) -> None:
        """Redo apply of committed journals and drop staging left by a previous run."""
        for source, journal in await self._run(self.store.leftover_journals):
            try:
                state = await self._run(self.store.settle, source, journal)
            except (OSError, StoreError) as exc:
                log.error("recovery of %s/%s failed, retried with its next cycle: %s",
                          source, journal.path.name, exc)
                await self._run(journal.record_apply_error, f"redo after a restart failed: {exc}")
                continue
            if state is None:
                log.info("discarded uncommitted staging of %s/%s", source, journal.path.name)
            else:
                log.info("redid apply of %s/%s cycle %d", source, journal.path.name, state.cycle_id)
        # Points the policy no longer keeps (it may have changed; a prune may have been cut short).
        for source, group, state in await self._run(self.store.groups):
            self.points[(source, group)] = (state.cycle_id, state.cut_time)
            try:
                await self._run(self.store.prune, source, group, state)
            except OSError as exc:
                log.error("pruning the points of %s/%s failed: %s", source, group, exc)

    async def handle(self, stream: trio.abc.Stream, *, peer: str | None = None,
                     certified: str | None = None, pinned: Callable[[], bool] | None = None) -> None:
        """Serve one connection until it ends. Never raises (except cancellation).

        ``certified`` is the source name pinned for the peer's certificate
        (vrfs/tls.py); None only on a receiver that runs with --insecure.
        ``pinned`` says whether that pin still stands: asked before each
        request, so a removed pin ends an open session at its next request."""
        peer = peer or peer_name(stream)
        frames = FrameStream(stream, self.limiter)
        try:
            await self._session(frames, peer, certified, pinned)
        except ProtocolError as exc:
            log.warning("%s: refused: %s; closing connection", peer, exc)
            await _send_error(frames, str(exc))
        except StoreError as exc:
            log.error("%s: store error: %s; closing connection", peer, exc)
            await _send_error(frames, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("%s: connection lost: %s", peer, exc.__cause__ or exc)
        except OSError as exc:
            log.error("%s: I/O error in the store: %s; closing connection", peer, exc)
            await _send_error(frames, f"receiver I/O error: {exc}")
        except Exception as exc:
            log.exception("%s: internal error; closing connection", peer)
            await _send_error(frames, f"receiver internal error: {type(exc).__name__}")
        finally:
            await close(stream)

    async def _session(self, frames: FrameStream, peer: str, certified: str | None,
                       pinned: Callable[[], bool] | None = None) -> None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            hello = decode_control((await frames.receive_expect(MsgType.HELLO)).payload)
        if scope.cancelled_caught:
            raise ProtocolError(f"no HELLO within {HANDSHAKE_TIMEOUT:g} s")
        source = check_name(field(hello, "source", str), "source name")
        if certified is not None and source != certified:
            # A source reads and writes its own namespace only: the name is the
            # certificate's, whatever the peer claims.
            raise ProtocolError(f"source name {source!r} is not the name pinned for this peer's certificate "
                                f"({certified!r})")
        admission.established()
        points, resync = await self._run(self._inventory, source)
        await frames.send_control(MsgType.WELCOME, {
            "store_id": self.store.store_id, "points": points, "software": f"vrfs {__version__}",
            "resync": resync, "features": [FEATURE_RAW_BATCH]})
        log.info("%s: source %r connected", peer, source)
        while True:
            frame = await frames.receive()
            if frame is None:
                log.info("%s: source %r disconnected", peer, source)
                return
            if pinned is not None and not pinned():
                raise ProtocolError(f"the certificate of source {source!r} is no longer pinned here (its pin was "
                                    "removed or replaced): session closed")
            if frame.type == MsgType.HASHES_REQ:
                await self._serve_hashes(frames, source, decode_control(frame.payload))
            elif frame.type == MsgType.CYCLE_BEGIN:
                header = header_from_json(decode_control(frame.payload))
                await self._receive_cycle(frames, peer, source, header)
            else:
                raise ProtocolError(f"unexpected {frame.type.name} between cycles")

    def _inventory(self, source: str) -> tuple[dict[str, int], dict[str, list[str]]]:
        """The source's points, and per group the disks whose replica is missing
        or has the wrong size (the source compares them again)."""
        points: dict[str, int] = {}
        resync: dict[str, list[str]] = {}
        for src, group, state in self.store.groups():
            if src != source:
                continue
            points[group] = state.cycle_id
            if state.fenced is not None or self.store.journal_committed(source, group):
                continue  # being brought to its next point; checked when that is done
            damaged = self.store.damaged(source, state)
            if damaged:
                log.warning("%s/%s: %s; asking for a full sync", source, group, "; ".join(damaged.values()))
                resync[group] = [d.hex() for d in damaged]
        return points, resync

    async def _serve_hashes(self, frames: FrameStream, source: str, request: dict[str, Any]) -> None:
        group = check_name(field(request, "group", str), "group")
        disk = disk_from_json(request.get("disk"), group)
        start = int_field(request, "first", 0, 1 << 50) if "first" in request else 0
        wanted = int_field(request, "count", 0, 1 << 50) if "count" in request else None
        lineage = int_field(request, "lineage_point", 0, (1 << 63) - 1) if "lineage_point" in request else None
        try:
            state = await self._run(self.store.load_group, source, group)
        except StoreError:
            state = None  # damaged: open_copy gives nothing, and its cycles are refused
        copy = None
        if state is None or not state.fenced:
            copy = await self._run(self.store.open_copy, source, group, disk)
        if copy is None:
            await frames.send_control(MsgType.HASHES_END, {"present": False})
            return
        if lineage is not None and copy.basis.startswith("seed:"):
            seed = await self._run(self.store.seed_info, disk.disk_id)
            if seed and isinstance(seed.get("point"), int) and seed["point"] <= lineage \
                    and seed.get("dirty") is not None:
                # A reprotect's seed: the old source's image, which held its
                # point P plus the blocks in ``dirty`` (everything written after
                # P: checkpoint and hot extents). The source's disk started at
                # point K >= P of the same lineage; every cycle from P to K was
                # made of writes after P, so they are in ``dirty`` too. What
                # differs is what changed on either side: the source knows its
                # side, here is ours, and no block is read.
                os.close(copy.fd)
                await frames.send_control(MsgType.HASHES_END, {
                    "present": True, "blocks": 0, "size": copy.size, "basis": copy.basis,
                    "dirty": seed["dirty"]})
                log.info("%s/%s: %s: seed at point %d, the source started at %d: only the blocks changed "
                         "since are sent", source, group, disk.path, seed["point"], lineage)
                return
        try:
            end = math.ceil(copy.size / disk.block_size)
            if wanted is not None:
                end = min(end, start + wanted)
            count = max(0, end - start)
            for first in range(start, start + count, MAX_HASHES_PER_FRAME):
                n = min(MAX_HASHES_PER_FRAME, start + count - first)
                payload = await self._run(
                    lambda first=first, n=n: encode_hashes(first, hash_blocks(copy, disk.block_size, first, n)))
                await frames.send(MsgType.HASHES, payload)
        finally:
            os.close(copy.fd)
        await frames.send_control(MsgType.HASHES_END, {"present": True, "blocks": count, "size": copy.size,
                                                      "basis": copy.basis})

    async def _receive_cycle(self, frames: FrameStream, peer: str, source: str, header: CycleHeader) -> None:
        """Stage, commit and apply one cycle, or refuse it. A refusal concerns
        this group alone: the rest of the cycle is read and dropped, the source
        hears CYCLE_REFUSED, and the connection goes on with other groups."""
        key = (source, header.group)
        if key in self._busy:
            await self._refuse(frames, peer, source, header, Refusal(
                f"group {header.group!r} of {source!r} is busy (a cycle on another connection, or a "
                "failover or test failover at the DR site)"), drain=True)
            return
        self._hold(key)
        try:
            try:
                direct = await self._run(self._prepare, source, header)
            except (Refusal, OSError, StoreError) as exc:
                await self._refuse(frames, peer, source, header, _as_refusal(exc), drain=True)
                return
            try:
                # EFBIG: a new disk too large for the store.
                journal = await self._run(self.store.begin_cycle, source, header, direct)
            except OSError as exc:  # no room for even an empty journal: this group waits, the link stays
                await self._refuse(frames, peer, source, header,
                                   Refusal(f"cannot stage cycle {header.cycle_id}: {exc.strerror or exc}"),
                                   drain=True)
                return
            committed = False
            try:
                try:
                    await self._stage(frames, header, journal, key, frozenset(direct))
                except OSError as exc:  # the store's own trouble (ENOSPC, EIO), not the peer's
                    await self._run(journal.discard)
                    await self._refuse(frames, peer, source, header,
                                       Refusal(f"cannot stage cycle {header.cycle_id}: {exc.strerror or exc}"),
                                       drain=False)  # _stage read the cycle to its end
                    return
                committed = True
                crash_point("committed")
                try:
                    state = await self._run(self.store.apply, source, journal)
                except (OSError, StoreError) as exc:
                    message = f"cycle {header.cycle_id} is committed but cannot be applied: {exc}"
                    await self._run(journal.record_apply_error, message)
                    await self._refuse(frames, peer, source, header, Refusal(message), drain=False)
                    return
            finally:
                if not committed:
                    with trio.CancelScope(shield=True):
                        await self._run(journal.discard)
        finally:
            self._release(key)
        self.points[key] = (state.cycle_id, state.cut_time)
        self.cycles_committed[key] = self.cycles_committed.get(key, 0) + 1
        await frames.send_control(MsgType.COMMITTED, {"group": header.group, "cycle_id": state.cycle_id})
        log.info("%s: %s/%s at point %d (%d disks)", peer, source, header.group, state.cycle_id, len(state.disks))

    def _prepare(self, source: str, header: CycleHeader) -> dict[int, DiskEntry]:
        """Before anything is staged: finish the group's committed journal, and
        check that the cycle is newer than its point and fits the store.
        Returns the disks to stage whole (Store.direct_disks)."""
        old = self.store.load_group(source, header.group)
        if old is not None and old.fenced is not None:
            raise Fenced(f"group {header.group!r} is fenced: {old.fenced.get('reason', 'failed over')}; "
                         "nothing is written until a reprotect")
        self._settle_before(source, header)
        old = self.store.load_group(source, header.group)
        if old is not None and header.cycle_id <= old.cycle_id:
            raise Refusal(f"cycle {header.cycle_id} of {header.group!r} is not newer than the committed "
                          f"point {old.cycle_id}")
        self.store.check_cycle(source, header, old)
        return self.store.direct_disks(source, header)

    def _settle_before(self, source: str, header: CycleHeader) -> None:
        """A committed journal left by a failed apply goes in before anything newer.

        If it fails again on a disk that the new cycle deletes or compares
        afresh (a full sync), that disk's blocks are dropped from it: the new
        cycle decides that disk's content whatever the journal held, and the
        group is not wedged by a disk the store can never hold (EFBIG)."""
        journal = self.store.staged_cycle(source, header.group)
        if not journal.committed:
            journal.discard()  # staging of a cycle that never committed
            return
        replaced = {d.disk_id for d in header.disks if d.disk_id not in header.full_sync}
        for _ in range(MAX_DISKS_PER_GROUP + 1):
            try:
                self.store.apply(source, journal)
                return
            except ApplyFailed as exc:
                if exc.disk_id in replaced:
                    journal.record_apply_error(str(exc))
                    raise Refusal(f"an earlier committed cycle cannot be applied: {exc}") from None
                how = "compares it afresh" if exc.disk_id in header.full_sync else "deletes it"
                log.warning("%s/%s: %s; the new cycle %s, so its blocks are dropped from the earlier cycle",
                            source, header.group, exc, how)
                journal.skip(exc.disk_id)
            except (OSError, StoreError) as exc:
                journal.record_apply_error(str(exc))
                raise Refusal(f"an earlier committed cycle cannot be applied: {exc}") from None

    async def _refuse(self, frames: FrameStream, peer: str, source: str, header: CycleHeader,
                      refusal: Refusal, *, drain: bool) -> None:
        log.warning("%s: refused cycle %d of %s/%s: %s", peer, header.cycle_id, source, header.group, refusal)
        key = (source, header.group)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        if drain:
            await _drain_cycle(frames)
        try:
            state = await self._run(self.store.load_group, source, header.group)
        except StoreError:
            state = None
        await frames.send_control(MsgType.CYCLE_REFUSED, {
            "group": header.group, "cycle_id": header.cycle_id, "message": str(refusal)[:1000],
            "resync": [d.hex() for d in refusal.resync], "point": state.cycle_id if state else 0,
            "fenced": isinstance(refusal, Fenced), "diverged": isinstance(refusal, Diverged)})

    async def _stage(self, frames: FrameStream, header: CycleHeader, journal: Journal,
                     key: tuple[str, str] = ("", ""), direct: frozenset[int] = frozenset()) -> None:
        """Receive the cycle's batches into the journal (the disks in
        ``direct`` into their replicas-to-be) and commit it once the manifest checks out."""
        # A hostile peer must not fill the store: no cycle holds more blocks than its disks have.
        limit = sum(d.block_count for d in header.disks)
        manifest = xxhash.xxh3_64()
        count = 0
        # The next frame is received (and decrypted) while the previous one is
        # decoded and written: at most two batches in memory.
        # A failure to store (the peer's bad batch, the store's ENOSPC) stops
        # the reader between frames, never inside one: after a refusal the
        # rest of the cycle is drained from a stream still in step.
        to_store, batches = trio.open_memory_channel[Frame](0)
        failure: ProtocolError | OSError | None = None

        async def store() -> None:
            nonlocal count, failure
            async with batches:
                async for batch_frame in batches:
                    if failure is not None:
                        continue
                    try:
                        batch = await self._run(_stage_batch, journal, batch_frame, header.disks, direct,
                                                count, limit)
                        count += batch.count
                    except (ProtocolError, OSError) as exc:
                        failure = exc
                        continue
                    manifest.update(batch.manifest)
                    crash_point("staging")

        # What went wrong with a later frame (the stream ended, garbage) is
        # reported only if every earlier batch stored well: the first fault wins.
        reader_error: ProtocolError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store)
                async with to_store:
                    while failure is None:
                        try:
                            frame = await _next_in_cycle(frames, defer_batch_checksum=True)
                        except ProtocolError as exc:
                            reader_error = exc
                            break
                        if frame.type == MsgType.CYCLE_END:
                            break
                        self.bytes_received[key] = self.bytes_received.get(key, 0) + len(frame.payload)
                        await to_store.send(frame)
        except BaseExceptionGroup as group:  # the one failure that mattered, not the group
            raise first_failure(group) from None
        if failure is None and reader_error is not None:
            raise reader_error
        if failure is not None:
            if isinstance(failure, OSError):
                # The store's own trouble refuses this cycle alone: its staging
                # goes at once, and the rest of it is read and dropped here, so
                # the stream is at a cycle's end whichever frame the reader had reached.
                await self._run(journal.discard)
                if reader_error is None and frame.type != MsgType.CYCLE_END:
                    await _drain_cycle(frames)
            raise failure
        end = decode_control(frame.payload)
        declared = int_field(end, "blocks", 0, 1 << 62)
        if declared != count:
            raise ProtocolError(f"manifest declares {declared} blocks, received {count}")
        if field(end, "manifest", str) != manifest.hexdigest():
            raise ProtocolError("manifest hash does not match the blocks received")
        await self._run(journal.commit, header, count, manifest.hexdigest())


def _stage_batch(journal: Journal, frame: Frame, disks: tuple[DiskEntry, ...], direct: frozenset[int],
                 count: int, limit: int) -> DecodedBatch:
    """One batch, in one worker thread: checked (checksum, records, and no
    more blocks in the cycle than ``limit`` with the ``count`` before it),
    then written to the journal (the disks in ``direct`` to their replicas-to-be)."""
    batch = checked_batch(frame, disks, direct)
    if count + batch.count > limit:
        raise ProtocolError(f"cycle sends more blocks ({count + batch.count}) than its disks hold ({limit})")
    if batch.journal:
        journal.append(batch.journal)
    journal.write_direct(batch.direct)
    return batch


async def _next_in_cycle(frames: FrameStream, *, defer_batch_checksum: bool = False) -> Frame:
    with trio.move_on_after(CYCLE_IDLE_TIMEOUT) as scope:
        return await frames.receive_expect(MsgType.BATCH, MsgType.CYCLE_END,
                                           defer_batch_checksum=defer_batch_checksum)
    assert scope.cancelled_caught
    raise ProtocolError(f"nothing for {CYCLE_IDLE_TIMEOUT:g} s inside a cycle")


async def _drain_cycle(frames: FrameStream) -> None:
    """Read and drop the rest of a refused cycle, up to its CYCLE_END."""
    while (await _next_in_cycle(frames)).type != MsgType.CYCLE_END:
        pass


def _as_refusal(exc: Exception) -> Refusal:
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, OSError):
        return Refusal(f"receiver I/O error: {exc.strerror or exc}")
    return Refusal(str(exc))


async def _send_error(frames: FrameStream, message: str) -> None:
    """Tell the peer why, best effort, without waiting long for a stuck peer.

    The peer may still be sending batches: closing with unread data would
    reset the connection and lose the ERROR frame, so the rest of its input
    is drained (for a bounded time) after our side is shut.
    """
    with trio.move_on_after(3):
        try:
            await frames.send_control(MsgType.ERROR, {"message": message[:1000]})
            await frames.stream.send_eof()  # type: ignore[attr-defined]
            drained = 0
            while drained < (64 << 20):
                chunk = await frames.stream.receive_some(1 << 20)
                if not chunk:
                    break
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
            pass


def peer_name(stream: trio.abc.Stream) -> str:
    """host:port of the peer, for log lines."""
    while hasattr(stream, "transport_stream"):  # TLS (vrfs/tls.py) over the socket
        stream = stream.transport_stream
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "unknown peer"
