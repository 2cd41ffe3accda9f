"""Bandwidth limit of the replication link (`vrfs mount --bwlimit`).

Parsing of the rate and its time-of-day schedule, a token bucket, and a
stream that sends through it. The rate-limited stream sits between the TCP
socket and TLS, so everything the source sends is counted: every frame,
the handshake and its control messages, TLS records. TCP, IP and Ethernet
headers are added per segment from the connection's MSS, so the limit holds
for what the interface transmits (docs/wan.md).

Syntax (see ``RATE_HELP``): a rate needs its unit, bits or bytes per second,
so that "50M" can never be read the wrong way.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from vrfs.errors import EXIT_USAGE, UserError

RATE_HELP = ("RATE is bits per second with a unit, e.g. 800kbit, 50Mbit, 1.5Gbit, or bytes per second "
             "with /s, e.g. 6MB/s (k, M, G, T are powers of 1000); 0 means no limit")
SCHEDULE_HELP = ("a time-of-day schedule in local time, e.g. \"08:00-18:00=50Mbit,*=0\": comma-separated "
                 "HH:MM[:SS]-HH:MM[:SS]=RATE ranges (a range may wrap midnight; ranges must not overlap) and "
                 "*=RATE for the rest of the day (default 0, no limit)")

_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgtKMGT]?)bit|([kKMGT]?)B/s)", re.IGNORECASE)
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
DAY = 86400
MAX_RATE = 1e13  # bytes per second: 80 Tbit/s, beyond any link

BURST_SECONDS = 0.1  # the bucket holds at most this much of the rate
CHUNK = 64 << 10  # largest piece handed to the socket at once
MIN_CHUNK = 4 << 10
MAX_SLEEP = 0.25  # a waiting sender looks at the schedule at least this often
RECHECK = 60.0  # the schedule is read again at least this often (clock changes, DST)
# Per TCP segment on an Ethernet interface: 14 (Ethernet) + 20 (IPv4) + 20 (TCP) + 12 (timestamps);
# IPv6 adds 20. Preamble, FCS and inter-frame gap are not counted (nor does `ip -s link`).
ETHERNET_HEADER = 14
SEGMENT_OVERHEAD_V4 = ETHERNET_HEADER + 20 + 20 + 12
SEGMENT_OVERHEAD_V6 = SEGMENT_OVERHEAD_V4 + 20


def parse_rate(text: str, what: str = "--bwlimit") -> float | None:
    """'50Mbit' -> 6_250_000.0 bytes per second; '0' -> None (no limit)."""
    t = text.strip()
    if re.fullmatch(r"0+(?:\.0*)?", t):
        return None
    m = _RATE.fullmatch(t)
    if not m:
        raise UserError(f"bad {what} rate {text!r}: {RATE_HELP}", EXIT_USAGE)
    if m.group(3) is not None and not t.endswith("B/s"):
        raise UserError(f"bad {what} rate {text!r}: bytes per second is written with a capital B, e.g. 6MB/s "
                        f"(Mb/s would be bits); {RATE_HELP}", EXIT_USAGE)
    number = float(m.group(1))
    if m.group(2) is not None:
        rate = number * _PREFIX[m.group(2).lower()] / 8
    else:
        rate = number * _PREFIX[m.group(3).lower()]
    if rate == 0:
        return None
    if rate < 1000:
        raise UserError(f"bad {what} rate {text!r}: below 1kB/s (8kbit); use 0 for no limit", EXIT_USAGE)
    if not math.isfinite(rate) or rate > MAX_RATE:
        raise UserError(f"bad {what} rate {text!r}: too large", EXIT_USAGE)
    return rate


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "unlimited"
    bits = rate * 8
    for unit, scale in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


def _parse_time(text: str, what: str, whole: str) -> int:
    m = _TIME.fullmatch(text.strip())
    if not m:
        raise UserError(f"bad {what} {whole!r}: {text.strip()!r} is not a time of day HH:MM[:SS]", EXIT_USAGE)
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if (h, mi, s) == (24, 0, 0):
        return DAY
    if h > 23 or mi > 59 or s > 59:
        raise UserError(f"bad {what} {whole!r}: {text.strip()!r} is not a time of day (00:00-24:00)", EXIT_USAGE)
    return h * 3600 + mi * 60 + s


@dataclass(frozen=True)
class Range:
    start: int  # seconds after local midnight
    end: int  # may be smaller than start: the range wraps midnight
    rate: float | None

    def contains(self, t: float) -> bool:
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def spans(self) -> list[tuple[int, int]]:
        if self.start < self.end:
            return [(self.start, self.end)]
        return [(self.start, DAY), (0, self.end)]


@dataclass(frozen=True)
class Schedule:
    ranges: tuple[Range, ...]
    default: float | None  # the rate outside every range; None: no limit

    @property
    def limited(self) -> bool:
        return self.default is not None or any(r.rate is not None for r in self.ranges)

    def rate_at(self, t: float) -> float | None:
        """The rate at t seconds after local midnight."""
        for r in self.ranges:
            if r.contains(t):
                return r.rate
        return self.default

    def until_change(self, t: float) -> float:
        """Seconds from t (after local midnight) to the next boundary."""
        best = float(DAY)
        for r in self.ranges:
            for b in (r.start, r.end % DAY):
                d = (b - t) % DAY
                if d > 0:
                    best = min(best, d)
        return best

    def peak(self) -> float | None:
        """The highest rate of the day; None when some time of day is unlimited."""
        rates = [r.rate for r in self.ranges]
        covered = sum(e - s for r in self.ranges for s, e in r.spans())
        if covered < DAY:
            rates.append(self.default)
        if any(r is None for r in rates):
            return None
        return max(r for r in rates if r is not None)

    def describe(self) -> str:
        if not self.ranges:
            return format_rate(self.default)
        parts = [f"{_hms(r.start)}-{_hms(r.end)}={format_rate(r.rate)}" for r in self.ranges]
        return ",".join(parts + [f"*={format_rate(self.default)}"])


def _hms(t: int) -> str:
    h, rest = divmod(t, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" + (f":{s:02d}" if s else "")


def parse_schedule(text: str, what: str = "--bwlimit") -> Schedule:
    """'50Mbit', or '08:00-18:00=50Mbit,22:00-06:00=1Gbit,*=0'."""
    items = [i.strip() for i in text.split(",")]
    if len(items) == 1 and "=" not in items[0]:
        if not items[0]:
            raise UserError(f"bad {what} {text!r}: empty; {RATE_HELP}", EXIT_USAGE)
        return Schedule((), parse_rate(items[0], what))
    ranges: list[Range] = []
    default: float | None = None
    seen_default = False
    for item in items:
        when, eq, rate_text = item.partition("=")
        if not eq:
            raise UserError(f"bad {what} {text!r}: {item!r} is not WHEN=RATE; {SCHEDULE_HELP}", EXIT_USAGE)
        rate = parse_rate(rate_text, what)
        when = when.strip()
        if when == "*":
            if seen_default:
                raise UserError(f"bad {what} {text!r}: '*' given twice", EXIT_USAGE)
            seen_default, default = True, rate
            continue
        start_text, dash, end_text = when.partition("-")
        if not dash:
            raise UserError(f"bad {what} {text!r}: {when!r} is not a range HH:MM-HH:MM or *; {SCHEDULE_HELP}",
                            EXIT_USAGE)
        start, end = _parse_time(start_text, what, text), _parse_time(end_text, what, text)
        if start % DAY == end % DAY:
            raise UserError(f"bad {what} {text!r}: the range {when!r} is empty (use *=RATE for all day)", EXIT_USAGE)
        new = Range(start % DAY, end, rate)
        for old in ranges:
            if any(max(a, c) < min(b, d) for a, b in old.spans() for c, d in new.spans()):
                raise UserError(f"bad {what} {text!r}: {_hms(old.start)}-{_hms(old.end)} and {when} overlap",
                                EXIT_USAGE)
        ranges.append(new)
    return Schedule(tuple(ranges), default)


def seconds_of_day(wall: float) -> float:
    """Local time of day, in seconds after midnight."""
    lt = time.localtime(wall)
    return lt.tm_hour * 3600 + lt.tm_min * 60 + lt.tm_sec + (wall - math.floor(wall))


class TokenBucket:
    """Bytes per second by the schedule; a burst of at most BURST_SECONDS of
    the rate. ``take`` charges first and then waits off any debt, so one
    large piece is paid for in full before the next may go."""

    def __init__(self, schedule: Schedule, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.schedule = schedule
        self._clock = clock
        self._wall = wall
        self._rate: float | None = None
        self._valid_until = -math.inf
        self._tokens = 0.0
        self._last = clock()
        self.charged = 0  # bytes charged so far (wire estimate)

    def rate(self) -> float | None:
        now = self._clock()
        if now >= self._valid_until:
            sod = seconds_of_day(self._wall())
            new = self.schedule.rate_at(sod)
            if self._rate is None and new is not None:
                self._tokens, self._last = 0.0, now  # from unlimited: start empty, no saved-up burst
            self._rate = new
            self._valid_until = now + min(self.schedule.until_change(sod), RECHECK)
        return self._rate

    def _refill(self, rate: float) -> None:
        now = self._clock()
        self._tokens = min(rate * BURST_SECONDS, self._tokens + (now - self._last) * rate)
        self._last = now

    def chunk(self) -> int:
        rate = self.rate()
        if rate is None:
            return CHUNK
        return max(MIN_CHUNK, min(CHUNK, int(rate * BURST_SECONDS)))

    async def take(self, n: float) -> None:
        self.charged += int(n)
        rate = self.rate()
        if rate is None:
            return
        self._refill(rate)
        self._tokens -= n
        while self._tokens < -1:  # a byte's rounding is no debt
            wait = min(-self._tokens / rate, MAX_SLEEP, self._valid_until - self._clock())
            await trio.sleep(max(0.0005, wait))
            new = self.rate()
            if new is None:
                self._tokens = 0.0
                return
            rate = new
            self._refill(rate)


def segment_overhead(sock: socket.socket | trio.socket.SocketType) -> float:
    """Header bytes per payload byte for this connection: per segment of its MSS."""
    try:
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    except OSError:
        mss = 0
    if mss <= 0:
        mss = 1448
    per = SEGMENT_OVERHEAD_V6 if sock.family == socket.AF_INET6 else SEGMENT_OVERHEAD_V4
    return per / mss


class RateLimitedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose sends pass the token bucket in chunks of at most
    CHUNK (or BURST_SECONDS of the rate), each charged with its TCP/IP and
    Ethernet headers. Receiving is not limited."""

    def __init__(self, stream: trio.SocketStream, bucket: TokenBucket) -> None:
        self.transport_stream = stream
        self.socket = stream.socket
        self.bucket = bucket
        self.overhead = segment_overhead(stream.socket)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            piece = view[pos:pos + self.bucket.chunk()]
            await self.bucket.take(len(piece) * (1 + self.overhead))
            await self.transport_stream.send_all(piece)
            pos += len(piece)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
