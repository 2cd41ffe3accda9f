"""Prometheus metrics: `vrfs mount --metrics HOST:PORT` and `vrfs serve
--metrics HOST:PORT` answer GET /metrics (docs/monitoring.md lists them).

The exposition format and its conventions come from prometheus_client;
values are read from the shipper or the receiver when scraped (custom
collectors), never updated on the write path. The endpoint is served by
trio in the daemon's own loop, so a scrape needs no lock: at the mount it
reads the groups a few at a time, each group consistent in itself
(SourceCollector), and a slow or broken scraper holds only its own task. A failing scrape is answered 500 and
logged; nothing here can take the daemon down. The port is bound before the
daemon starts, so a port in use is a one-line startup error.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import parse_address
from vrfs.stepbudget import StepBudget

if TYPE_CHECKING:
    from vrfs.receiver import Receiver
    from vrfs.shipper import Shipper

log = logging.getLogger("vrfs.metrics")

REQUEST_TIMEOUT = 10.0  # seconds a scraper gets to send its request and read the answer
MAX_REQUEST = 8192
MAX_SCRAPES = 8  # connections at once (see _Scrapes)


def label(name: str) -> str:
    """A label value: a group is named by a directory, whose name may hold
    bytes that are not UTF-8 (surrogate escapes here). Written as `ls -b`
    would (vm\\xff), else the whole exposition fails to encode, every group's
    metrics with it. Quotes, backslashes and newlines are escaped by the
    exposition itself."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class GroupValues:
    """One group's numbers as a scrape reports them, read in one loop step."""

    group: str
    lag: float
    point_age: float | None
    rpo: float
    predicted: bool
    dirty: int
    sent: int
    cycles: int
    errors: int
    refusals: int


class SourceCollector(Collector):
    """Per group of a mounted datastore (labels: source = its --name, group).

    ``refresh`` reads every group's values a group at a time, yielding to the
    loop past a small time budget (vrfs/stepbudget.py): on the mount the loop
    also serves FUSE, and a scrape of 1,000 disks in one step held it for
    milliseconds. Each group's values are of one instant; two groups may be a
    few ms apart. ``collect`` (called by prometheus_client while formatting)
    only reads the last complete snapshot."""

    def __init__(self, shipper: "Shipper") -> None:
        self.shipper = shipper
        self._snapshot: list[GroupValues] | None = None

    async def refresh(self) -> None:
        snapshot = []
        budget = StepBudget()
        for group in self.shipper.monitor.group_names():
            snapshot.append(self._values(group))
            await budget.pause()
        self._snapshot = snapshot

    def _values(self, group: str) -> GroupValues:
        shipper, monitor = self.shipper, self.shipper.monitor
        c = monitor.counters(group)
        return GroupValues(
            group=group, lag=monitor.lag(group)[0], point_age=monitor.point_age(group), rpo=monitor.rpo(group),
            predicted=bool(shipper.predicted_breach.get(group, False)),
            dirty=sum(min(d.dirty_count() * d.block_size, max(d.size, 0))
                      for d in shipper.tracker.group_disks(group)),
            sent=monitor.wire_bytes(group), cycles=c.cycles, errors=c.errors, refusals=c.refusals)

    def collect(self) -> Iterator[Metric]:
        """One family at a time: the endpoint formats each before the next is
        built, and may yield to the loop in between (``_exposition``)."""
        shipper = self.shipper
        snapshot = self._snapshot
        if snapshot is None:  # collected without a refresh (not through serve): read it all now
            snapshot = [self._values(group) for group in shipper.monitor.group_names()]
        for family_type, name, doc, value_of in SOURCE_FAMILIES:
            family = family_type(name, doc, labels=["source", "group"])
            for v in snapshot:
                value = value_of(v)
                if value is not None:
                    family.add_metric([label(shipper.name), label(v.group)], value)
            yield family
        connected = GaugeMetricFamily("vrfs_connected", "1 while the link to the DR site is up", labels=["source"])
        connected.add_metric([label(shipper.name)], float(shipper.connected))
        yield connected


SOURCE_FAMILIES: list[tuple[type, str, str, Callable[[GroupValues], float | None]]] = [
    (GaugeMetricFamily, "vrfs_lag_seconds", "Age of the oldest write not yet in a point acknowledged by the DR site "
     "(what a disaster now would lose); 0 when nothing was written since that point", lambda v: v.lag),
    (GaugeMetricFamily, "vrfs_point_age_seconds", "Age of the newest point acknowledged by the DR site (now minus "
     "its cut time); absent until this daemon knows the cut time", lambda v: v.point_age),
    (GaugeMetricFamily, "vrfs_rpo_seconds", "Recovery point objective of the group", lambda v: v.rpo),
    (GaugeMetricFamily, "vrfs_rpo_violated", "1 when vrfs_lag_seconds exceeds vrfs_rpo_seconds",
     lambda v: float(v.lag > v.rpo)),
    (GaugeMetricFamily, "vrfs_rpo_breach_predicted", "1 when the scheduler predicts the group will miss its RPO",
     lambda v: float(v.predicted)),
    (GaugeMetricFamily, "vrfs_dirty_bytes", "Bytes of blocks changed and not yet acknowledged by the DR site",
     lambda v: float(v.dirty)),
    (CounterMetricFamily, "vrfs_sent_bytes", "Bytes sent on the wire in cycles (compressed, every cycle tried)",
     lambda v: v.sent),
    (CounterMetricFamily, "vrfs_cycles", "Cycles acknowledged (committed) by the DR site", lambda v: v.cycles),
    (CounterMetricFamily, "vrfs_cycle_errors", "Cycles that failed (link or read error) before an answer",
     lambda v: v.errors),
    (CounterMetricFamily, "vrfs_cycle_refusals", "Cycles the receiver refused (CYCLE_REFUSED)", lambda v: v.refusals),
]


class ReceiverCollector(Collector):
    """Per replicated group at the DR site (labels: source, group)."""

    def __init__(self, receiver: "Receiver") -> None:
        self.receiver = receiver

    def collect(self) -> Iterator[Metric]:
        r = self.receiver
        labels = ["source", "group"]
        age = GaugeMetricFamily("vrfs_point_age_seconds", "Age of the group's newest committed point (now minus "
                                "its cut time at the source)", labels=labels)
        point = GaugeMetricFamily("vrfs_point_id", "Id of the group's newest committed point", labels=labels)
        committed = CounterMetricFamily("vrfs_cycles_committed", "Cycles committed since this daemon started",
                                        labels=labels)
        received = CounterMetricFamily("vrfs_received_bytes", "Bytes of cycle batches received (compressed)",
                                       labels=labels)
        refusals = CounterMetricFamily("vrfs_cycle_refusals", "Cycles refused (CYCLE_REFUSED)", labels=labels)
        now = time.time()
        keys = sorted(set(r.points) | set(r.cycles_committed) | set(r.bytes_received) | set(r.refusals))
        for key in keys:
            values = [label(v) for v in key]
            if key in r.points:
                cycle_id, cut_time = r.points[key]
                age.add_metric(values, max(0.0, now - cut_time))
                point.add_metric(values, cycle_id)
            committed.add_metric(values, r.cycles_committed.get(key, 0))
            received.add_metric(values, r.bytes_received.get(key, 0))
            refusals.add_metric(values, r.refusals.get(key, 0))
        yield from (age, point, committed, received, refusals)


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)  # process_* (CPU, memory, open fds) of the daemon
    registry.register(collector)
    return registry


# ---------------------------------------------------------------- the endpoint

def bind(address: str) -> socket.socket:
    """The listening socket of --metrics HOST:PORT, or a one-line UserError."""
    if not re.search(r":\d+\s*$", address):
        raise UserError(f"bad --metrics {address!r}: expected HOST:PORT (e.g. 127.0.0.1:9464)", EXIT_USAGE)
    host, port = parse_address(address, default_host="127.0.0.1", what="--metrics")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise UserError(f"--metrics {address}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


async def serve(sock: socket.socket, registry: CollectorRegistry,
                refresh: Callable[[], Awaitable[None]] | None = None) -> None:
    """Answer scrapes until cancelled. Never raises anything but cancellation.
    ``refresh`` reads the daemon's state before each scrape is formatted."""
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        host, port = sock.getsockname()[:2]
        log.info("metrics at http://%s:%d/metrics", host, port)
        scrapes = _Scrapes()

        async def handle(stream: trio.SocketStream) -> None:
            scrape = scrapes.admit()
            if scrape is None:
                await stream.aclose()
                return
            try:
                with scrape.scope:
                    await _answer(stream, registry, refresh, scrape.asked)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            except Exception:  # a scrape must never take the daemon down
                log.exception("metrics request failed")
            finally:
                scrapes.done(scrape)
                await trio.aclose_forcefully(stream)

        await trio.serve_listeners(handle, [listener])
    except Exception:
        log.exception("the metrics endpoint failed; the daemon goes on without it")


class _Scrape:
    def __init__(self, waiting: dict["_Scrape", None]) -> None:
        self.scope = trio.CancelScope(deadline=trio.current_time() + REQUEST_TIMEOUT)
        self.evicted = False
        self._waiting = waiting

    def asked(self) -> None:
        """The request has arrived: from now on the connection is a scrape in progress."""
        self._waiting.pop(self, None)


class _Scrapes:
    """At most MAX_SCRAPES connections at once (file descriptors of a daemon
    that serves a datastore). When all are taken, a new connection replaces
    the oldest one that has not sent its request yet: Prometheus sends its
    request at once, so idle connections, however many, cannot keep it out;
    only scrapes in progress can fill the table."""

    def __init__(self) -> None:
        self.open = 0
        self.waiting: dict[_Scrape, None] = {}  # connections yet to send their request, oldest first

    def admit(self) -> _Scrape | None:
        if self.open >= MAX_SCRAPES:
            if not self.waiting:
                return None
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.evicted = True
            oldest.scope.cancel()
            self.open -= 1  # counted out now, not when its handler gets to run
        scrape = _Scrape(self.waiting)
        self.open += 1
        self.waiting[scrape] = None
        return scrape

    def done(self, scrape: _Scrape) -> None:
        if scrape.evicted:
            return
        self.waiting.pop(scrape, None)
        self.open -= 1


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry,
                  refresh: Callable[[], Awaitable[None]] | None, asked: Callable[[], None]) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return
        request += chunk
        if len(request) > MAX_REQUEST:
            await _send(stream, 431, b"request too large\n")
            return
    asked()
    parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        await _send(stream, 405, b"only GET /metrics\n")
        return
    path = parts[1].split(b"?", 1)[0]
    if path not in (b"/metrics", b"/"):
        await _send(stream, 404, b"metrics are at /metrics\n")
        return
    try:
        if refresh is not None:
            await refresh()
        body = await _exposition(registry)
    except Exception:
        log.exception("collecting metrics failed")
        await _send(stream, 500, b"collecting metrics failed (see the daemon's log)\n")
        return
    await _send(stream, 200, body, CONTENT_TYPE_LATEST, head=parts[0] == b"HEAD")


class _OneFamily(Collector):
    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


async def _exposition(registry: CollectorRegistry) -> bytes:
    """generate_latest(registry), a metric family at a time with yields past
    the step budget: 300 groups took 15 ms to format in one step. The text is
    the same (each family is a block of its own in the format)."""
    budget = StepBudget()
    parts = []
    for family in registry.collect():
        parts.append(generate_latest(_OneFamily(family)))
        await budget.pause()
    return b"".join(parts)


async def _send(stream: trio.SocketStream, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                head: bool = False) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
              500: "Internal Server Error"}[code]
    header = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              "Connection: close\r\n\r\n").encode()
    await stream.send_all(header if head else header + body)
