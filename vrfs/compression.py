"""How hard to compress each batch: decided per batch from measured rates.

The source compresses batches in worker threads while earlier ones drain
into the socket (vrfs/link.py). Compression pays only when the link, not the
compressor, is what limits the cycle: a batch takes ``1 / (C * threads)``
seconds of compression per raw byte and ``R / D`` seconds of link per raw
byte (C: the level's compression throughput, R: its compressed/raw ratio, D:
the rate the socket drains wire bytes). The policy picks the level that
maximizes ``min(C * threads, D / R)``; sending raw is the level whose C is
unbounded and R is 1, so it wins whenever the link drains faster than the
compressor could feed it (loopback, a LAN, a 10 GbE link), and the harder
levels win, up to the ceiling (``--compress-level``), when the link is slow.
Among levels within a few percent of the best, the one that sends fewer
bytes is taken.

Measured, as exponentially weighted averages: C per level (raw bytes per
second of a worker's wall time, so contention for the CPU counts), R per
level relative to a cheap sample of the batch (the sample tells how
compressible *this* batch is, the per-level factor how much better the
level does than the sample), and D (wire bytes per second spent inside the
socket's send: a send that finds room in the socket buffer returns at once,
so a link faster than its feeders measures fast). Levels not measured yet
are estimated from the measured ones with zstd's typical relative speeds and
ratios, and every PROBE_EVERY batches a neighbour of the current choice is
tried so that stale estimates get corrected.

Blocks that do not compress (the sample keeps more than 95 % of its size:
random, encrypted, already compressed data) go raw outright
(wire.encode_batch). A receiver that does not offer raw batches gets the
cheapest zstd level instead of raw.
"""

from __future__ import annotations

from vrfs.wire import RAW

FAST_LEVEL = -5  # zstd's fast levels are negative; -5 is about 2.5x level 1's speed
# zstd's typical throughput and ratio relative to level 1 (from its own
# benchmarks on mixed data); only used until a level is measured.
_SPEED = {FAST_LEVEL: 2.5, 1: 1.0, 2: 0.8, 3: 0.65, 4: 0.55, 5: 0.35, 6: 0.28, 7: 0.22, 8: 0.18, 9: 0.15,
          10: 0.12, 11: 0.09, 12: 0.08, 13: 0.035, 14: 0.03, 15: 0.025, 16: 0.015, 17: 0.01, 18: 0.008,
          19: 0.006}
_RATIO = {FAST_LEVEL: 1.25, 1: 1.0, 2: 0.97, 3: 0.94, 4: 0.93, 5: 0.91, 6: 0.90, 7: 0.89, 8: 0.88, 9: 0.88,
          10: 0.87, 11: 0.87, 12: 0.86, 13: 0.86, 14: 0.85, 15: 0.85, 16: 0.84, 17: 0.83, 18: 0.83, 19: 0.82}
DEFAULT_SPEED = 600e6  # level 1, bytes/s per thread, before anything is measured
WEIGHT = 0.25  # of a new measurement in the averages
PROBE_EVERY = 16  # batches between tries of a neighbouring level
NEAR = 0.95  # levels within this fraction of the best rate count as as good


class CompressionPolicy:
    def __init__(self, ceiling: int, threads: int, raw_allowed: bool) -> None:
        self.threads = max(1, threads)
        self.raw_allowed = raw_allowed
        self.set_ceiling(ceiling)
        self.speed: dict[int, float] = {}  # measured raw bytes/s per worker thread
        self.ratio: dict[int, float] = {}  # measured ratio / sample ratio
        self.sample = 0.5  # compressibility of recent batches (sample ratio at level 1)
        self.drain: float | None = None  # wire bytes/s of the socket while sending
        self.current: int | None = min(1, ceiling)  # until the link has been measured
        self._batches = 0

    def set_ceiling(self, ceiling: int) -> None:
        """The highest level allowed (a group's `compression` setting); what
        was measured of the link and the levels is kept."""
        self.ceiling = ceiling
        levels: list[int | None] = [RAW] if self.raw_allowed else []
        levels += [lv for lv in (FAST_LEVEL, 1, 3, 6, 9, 12, 15, 19) if lv <= ceiling]
        if ceiling not in levels:
            levels.append(ceiling)
        self.levels = levels
        if getattr(self, "current", None) is not None and self.current not in levels:
            self.current = min(1, ceiling)

    # --- measurements ----------------------------------------------------

    def encoded(self, level: int | None, raw_bytes: int, body_bytes: int, seconds: float,
                sample: float | None) -> None:
        if sample is not None:
            self.sample = _average(self.sample, sample)
        if level is None or raw_bytes < (64 << 10) or seconds <= 0:
            return
        self.speed[level] = _average(self.speed.get(level), raw_bytes / seconds)
        if sample:
            self.ratio[level] = _average(self.ratio.get(level), (body_bytes / raw_bytes) / sample)

    def sent(self, wire_bytes: int, seconds: float) -> None:
        if wire_bytes < (64 << 10):
            return
        self.drain = _average(self.drain, wire_bytes / max(seconds, 1e-6))

    # --- the decision ----------------------------------------------------

    def _speed(self, level: int) -> float:
        if level in self.speed:
            return self.speed[level]
        for known, value in self.speed.items():  # scale from a level that was measured
            return value * _SPEED.get(level, 0.006) / _SPEED.get(known, 0.006)
        return DEFAULT_SPEED * _SPEED.get(level, 0.006)

    def _ratio(self, level: int) -> float:
        factor = self.ratio.get(level)
        if factor is None:
            factor = _RATIO.get(level, 0.82)
        return min(1.0, self.sample * factor)

    def rate(self, level: int | None) -> float:
        """Raw bytes per second a cycle would move at ``level``."""
        drain = self.drain if self.drain is not None else float("inf")
        if level is None:
            return drain
        return min(self._speed(level) * self.threads, drain / max(self._ratio(level), 1e-3))

    def choose(self) -> int | None:
        """The level for the next batch (None: raw)."""
        self._batches += 1
        if self.drain is None:
            return self.current  # nothing measured of the link yet
        rates = {i: self.rate(level) for i, level in enumerate(self.levels)}
        best = max(rates.values())
        # The most compressing of the levels that are about as fast as the best.
        pick = max(i for i, r in rates.items() if r >= NEAR * best)
        if self._batches % PROBE_EVERY == 0:
            # Try a neighbour now and then, so that its estimate follows the data.
            near = [i for i in (pick + 1, pick - 1) if 0 <= i < len(self.levels) and self.levels[i] is not None]
            if near:
                pick = near[0]
        self.current = self.levels[pick]
        return self.current


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)
