"""Admission of connections to `vrfs serve`: how many, for how long, and
what happens when the process runs out of descriptors (docs/receiver.md,
*Limits*).

- At most ``max_connections`` connections are served at once. At the bound a
  new connection takes the place of the oldest connection still in its
  handshake (a slowloris cannot lock a real source out for longer than that
  source's own handshake), else of the session that has waited longest for
  its peer, if that wait exceeds ``SESSION_IDLE_TIMEOUT``; else it is closed
  at once, before anything is read from it. Reaching and leaving the bound
  is logged once each, not per connection.
- The accept loop is our own: when accept fails for lack of descriptors or
  memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) it logs once, retries every
  ``ACCEPT_RETRY`` seconds, and logs once more when it accepts again.
- Log lines of connections that have not completed their handshake are
  rate limited (``QUIET_LINES`` a minute, then a count of the lines dropped).
- Handshakes cost CPU (an ECDHE key and a signature) before anything proves
  who the peer is, so each peer address (an IPv6 peer's /64) may start only
  ``HANDSHAKE_BURST`` of them at once and ``HANDSHAKE_RATE`` a second after
  that; a connection beyond its address's share is closed at once, before
  any TLS work, which costs microseconds. A completed handshake gives its
  token back, so a source never runs short by connecting. A flood from one
  address thus keeps neither the CPU nor the listen queue from the others.

The receiver tells us that a connection completed its handshake by calling
:func:`established` from the connection's task. The stream handed to the
handler is a thin ``trio.abc.HalfCloseableStream`` over the accepted socket
(it keeps ``.socket``), so it can be wrapped further (TLS) before the
receiver reads from it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import trio

from vrfs.sockets import keep_unsent

log = logging.getLogger("vrfs.admission")

DEFAULT_MAX_CONNECTIONS = 64
# Descriptors kept for everything but connections: the store's journals,
# replicas and directories during apply, the log, the listeners, the control
# socket, worker threads. The default bound never eats into them.
FD_RESERVE = 64
# A session (past its handshake) that has waited this long for its peer gives
# its place to a new connection when the bound is reached. A real source is
# silent between cycles, for hours when nothing changes, so it is never cut
# for silence alone while there is room.
SESSION_IDLE_TIMEOUT = float(os.environ.get("VRFS_SESSION_IDLE_TIMEOUT", "600"))
ACCEPT_RETRY = 0.1  # seconds between accepts while descriptors or memory are short
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The bound counts as cleared again once this fraction of it is free (no log line per connection near it).
CLEAR_FRACTION = 0.25
# TCP keepalive of accepted sockets: a peer that vanished (no FIN, no RST) is
# noticed after about KEEPIDLE + KEEPINTVL * KEEPCNT seconds instead of hours.
KEEPIDLE, KEEPINTVL, KEEPCNT = 60, 15, 4
RECEIVE_SIZE = 256 << 10  # bytes a receive takes from the socket when the reader sets no bound
QUIET_WINDOW = 60.0
HANDSHAKE_BURST = 128  # handshakes one peer address may start at once
HANDSHAKE_RATE = 32.0  # and then per second
MAX_ADDRESSES = 4096  # addresses whose handshake budget is remembered
QUIET_LINES = 10  # log lines per window for connections still in their handshake

current_slot: ContextVar[Slot | None] = ContextVar("vrfs_admission_slot", default=None)
_configured: int | None = None  # `vrfs serve --max-connections`


def configure(max_connections: int | None) -> None:
    """The bound serve_listeners uses when it is given none (`vrfs serve --max-connections`)."""
    global _configured
    _configured = max_connections


def established() -> None:
    """The current connection completed its handshake (the receiver calls this
    once HELLO is accepted): it is no longer evicted for a newcomer, its log
    lines are no longer rate limited, and its handshake costs its address
    nothing. A no-op outside an admitted connection."""
    slot = current_slot.get()
    if slot is not None and not slot.established:
        slot.established = True
        if slot.gate is not None:
            slot.gate.handshakes.give_back(peer_address(slot.peer))


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_limit(requested: int | None) -> int:
    """The bound to use: ``requested``, or by default DEFAULT_MAX_CONNECTIONS,
    lowered so that connections leave FD_RESERVE descriptors to the store."""
    room = descriptor_limit() - FD_RESERVE
    if requested is None:
        return max(1, min(DEFAULT_MAX_CONNECTIONS, room))
    if requested > room:
        log.warning("--max-connections %d exceeds what the descriptor limit (%d) leaves beside %d for the "
                    "store: when descriptors run out, new connections wait in the backlog",
                    requested, descriptor_limit(), FD_RESERVE)
    return requested


class Slot:
    """One admitted connection."""

    __slots__ = ("established", "scope", "since", "waiting_since", "peer", "gate")

    def __init__(self, peer: str, gate: Gate | None = None) -> None:
        self.gate = gate
        self.established = False
        self.scope = trio.CancelScope()
        self.since = time.monotonic()
        self.waiting_since: float | None = None  # monotonic time since which it waits for its peer
        self.peer = peer


class HandshakeBudget:
    """Handshakes each peer address may start: a token bucket per address
    (HANDSHAKE_BURST deep, refilled at HANDSHAKE_RATE a second). Addresses
    whose bucket is full again are forgotten; past MAX_ADDRESSES the oldest
    half is forgotten too (they start again with a full bucket: a flood
    spread over that many addresses is one the network must stop)."""

    def __init__(self, burst: int = HANDSHAKE_BURST, rate: float = HANDSHAKE_RATE) -> None:
        self.burst, self.rate = float(burst), rate
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)
        self.refused: dict[str, int] = {}  # address -> connections closed since its first refusal was logged

    def take(self, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens = self.tokens(address, now)
        if tokens < 1:
            return False
        self.buckets.pop(address, None)  # re-inserted last: the dict stays in order of use
        self.buckets[address] = (tokens - 1, now)
        if len(self.buckets) > MAX_ADDRESSES:
            self._forget(now)
        return True

    def give_back(self, address: str, now: float | None = None) -> None:
        """A handshake completed: it costs its address nothing."""
        if address in self.buckets:
            now = time.monotonic() if now is None else now
            self.buckets[address] = (min(self.burst, self.tokens(address, now) + 1), now)

    def tokens(self, address: str, now: float) -> float:
        tokens, then = self.buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def _forget(self, now: float) -> None:
        for address in [a for a in self.buckets if self.tokens(a, now) >= self.burst]:
            del self.buckets[address]
        if len(self.buckets) > MAX_ADDRESSES:
            for address in list(self.buckets)[:len(self.buckets) // 2]:
                del self.buckets[address]


def peer_address(peer: str) -> str:
    """What a peer's handshake budget is kept by: its IPv4 address, or its IPv6 /64."""
    host = peer.rpartition(":")[0].strip("[]")
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return host
    if packed.startswith(bytes(10) + b"\xff\xff"):  # an IPv4 peer on a dual-stack socket
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class Gate:
    """The connection bound, and the state changes worth one log line each."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.slots: dict[Slot, None] = {}  # in order of admission
        self.full = False
        self.starved: OSError | None = None  # accept is failing for lack of resources
        self.handshakes = HandshakeBudget()

    def admit_address(self, peer: str) -> bool:
        """Whether the peer's address may start one more handshake now."""
        address = peer_address(peer)
        if self.handshakes.take(address):
            return True
        if address not in self.handshakes.refused and len(self.handshakes.refused) < QUIET_LINES:
            log.warning("%s: more than %d new connections at once and %g a second: those beyond are closed "
                        "before their handshake", address, HANDSHAKE_BURST, HANDSHAKE_RATE)
            self.handshakes.refused[address] = 0
        self.handshakes.refused[address] = self.handshakes.refused.get(address, 0) + 1
        return False

    def flood_ended(self) -> None:
        """One line for each address whose flood is over (its budget full again)."""
        now = time.monotonic()
        ended = [a for a in self.handshakes.refused if self.handshakes.tokens(a, now) >= HANDSHAKE_BURST]
        for address in ended[:QUIET_LINES]:
            log.info("%s: new connections admitted again; %d were closed before their handshake",
                     address, self.handshakes.refused.pop(address))
        if ended[QUIET_LINES:]:
            closed = sum(self.handshakes.refused.pop(a) for a in ended[QUIET_LINES:])
            log.info("%d more addresses: new connections admitted again; %d were closed before their handshake",
                     len(ended) - QUIET_LINES, closed)

    def admit(self, peer: str) -> Slot | None:
        if len(self.slots) >= self.limit:
            if not self.full:
                self.full = True
                log.warning("connection limit %d reached: new connections take the place of connections still "
                            "in their handshake, or of sessions silent for more than %g s, or are closed at once",
                            self.limit, SESSION_IDLE_TIMEOUT)
            victim = self._victim()
            if victim is None:
                return None
            self._evict(victim)
        slot = Slot(peer, self)
        self.slots[slot] = None
        return slot

    def release(self, slot: Slot) -> None:
        self.slots.pop(slot, None)
        if self.full and len(self.slots) <= self.limit * (1 - CLEAR_FRACTION):
            self.full = False
            log.info("connections below the limit again (%d of %d)", len(self.slots), self.limit)

    def _victim(self) -> Slot | None:
        for slot in self.slots:  # oldest first
            if not slot.established:
                return slot
        now = time.monotonic()
        idle = [s for s in self.slots if s.waiting_since is not None and now - s.waiting_since > SESSION_IDLE_TIMEOUT]
        return min(idle, key=lambda s: s.waiting_since or now) if idle else None

    def _evict(self, slot: Slot) -> None:
        self.slots.pop(slot, None)
        if slot.established:
            log.warning("%s: closing a session silent for %.0f s to make room for a new connection",
                        slot.peer, time.monotonic() - (slot.waiting_since or slot.since))
        slot.scope.cancel()

    def accept_failed(self, exc: OSError) -> None:
        if self.starved is None:
            log.error("cannot accept connections: %s; pending ones wait in the backlog, retrying every %g s",
                      exc.strerror or exc, ACCEPT_RETRY)
        self.starved = exc

    def accepted(self) -> None:
        if self.starved is not None:
            log.warning("accepting connections again (after %s)", self.starved.strerror or self.starved)
            self.starved = None


class AdmittedStream(trio.abc.HalfCloseableStream):
    """The accepted socket stream, noting when its reader waits for the peer."""

    def __init__(self, stream: trio.SocketStream, slot: Slot) -> None:
        self.transport = stream
        self.socket = stream.socket
        self.slot = slot

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.slot.waiting_since = time.monotonic()
        try:
            # TLS reads with no bound: take what the socket has, up to 256 KiB
            # (trio's default is 64 KiB), so that bulk data costs fewer reads.
            return await self.transport.receive_some(max_bytes or RECEIVE_SIZE)
        finally:
            self.slot.waiting_since = None

    async def aclose(self) -> None:
        await self.transport.aclose()


class _QuietUntilEstablished(logging.Filter):
    """At most QUIET_LINES lines per QUIET_WINDOW from connections that have
    not completed their handshake: a flood of junk connections is not a flood
    of log lines."""

    def __init__(self) -> None:
        super().__init__()
        self.window = time.monotonic()
        self.lines = 0
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        slot = current_slot.get()
        if slot is None or slot.established:
            return True
        self.roll()
        self.lines += 1
        if self.lines <= QUIET_LINES:
            return True
        self.dropped += 1
        return False

    def roll(self) -> None:
        now = time.monotonic()
        if now - self.window < QUIET_WINDOW:
            return
        if self.dropped:
            log.warning("%d log lines about connections that did not complete their handshake were left out "
                        "in the last %.0f s", self.dropped, now - self.window)
        self.window, self.lines, self.dropped = now, 0, 0


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except (OSError, ValueError):
        return "unknown peer"


def _keepalive(sock: trio.socket.SocketType) -> None:
    for opt, value in ((socket.SO_KEEPALIVE, 1),):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, value)
        except OSError:
            pass
    for name, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass


async def serve_listeners(handler: Callable[[AdmittedStream], Awaitable[object]],
                          listeners: list[trio.SocketListener], max_connections: int | None = None, *,
                          loggers: tuple[str, ...] = ("vrfs.receiver", "vrfs.tls"),
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Like trio.serve_listeners, with the bound, the eviction and the quiet
    handling of resource exhaustion described above. Runs until cancelled."""
    gate = Gate(connection_limit(_configured if max_connections is None else max_connections))
    quiet = _QuietUntilEstablished()
    for name in loggers:
        logging.getLogger(name).addFilter(quiet)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, handler, gate, nursery)
            nursery.start_soon(_roll, quiet, gate)
            task_status.started()
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(quiet)


async def _roll(quiet: _QuietUntilEstablished, gate: Gate) -> None:
    while True:
        await trio.sleep(QUIET_WINDOW / 4)
        quiet.roll()
        gate.flood_ended()


async def _accept_loop(listener: trio.SocketListener, handler: Callable[[AdmittedStream], Awaitable[object]],
                       gate: Gate, nursery: trio.Nursery) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            gate.accept_failed(exc)
            await trio.sleep(ACCEPT_RETRY)
            continue
        gate.accepted()
        peer = _peer(stream)
        slot = gate.admit(peer) if gate.admit_address(peer) else None
        if slot is None:
            stream.socket.close()  # at once, nothing read
            continue
        _keepalive(stream.socket)
        keep_unsent(stream.socket)  # the DR site sends too (hashes of a seeded full sync); trio set 16 KiB
        nursery.start_soon(_serve_one, handler, AdmittedStream(stream, slot), gate)


async def _serve_one(handler: Callable[[AdmittedStream], Awaitable[object]], stream: AdmittedStream,
                     gate: Gate) -> None:
    slot = stream.slot
    current_slot.set(slot)  # this task's own context: the receiver's established() and log lines see it
    try:
        with slot.scope:
            await handler(stream)
    finally:
        gate.release(slot)
        with trio.CancelScope(shield=True):
            await stream.aclose()  # the handler closes it too; closing twice is harmless
