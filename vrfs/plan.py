"""Capacity planning: the bandwidth a change rate needs at an RPO, and what a
link can hold. Pure computation; `vrfs plan` (vrfs/plancmd.py) reads the
operator's figures or measures a mount, and prints. docs/plan.md explains the
model and its formulas.

Units here: bytes, bytes per second, seconds. A link's rate in Mbit/s is
``rate * 8 / 1e6``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_COMPRESSION = 2.0  # zstd level 1 on VM images: 3.1 on a mix (DESIGN.md), 1.0 on random data
DEFAULT_RPOS = (30.0, 60.0, 300.0, 900.0, 3600.0)
BITS = 8


@dataclass(frozen=True)
class Workload:
    """What is to be replicated.

    ``change_rate`` is bytes per second of changed *blocks* (the tracking
    granularity, 64 KiB by default), over all disks together. ``distinct``
    says whether it was measured as distinct blocks per cycle (rewrites of a
    block between two cuts counted once) or given, in which case every byte
    counts and the figures are an upper bound. ``groups`` is the number of
    cycles (one per group, a VM) that share one RPO/2 window: each costs a
    round trip for its commit."""

    disk_sizes: tuple[int, ...]
    change_rate: float
    compression: float = DEFAULT_COMPRESSION
    distinct: bool = False
    allocated: int | None = None  # what an initial sync reads; default: the sum of the sizes
    groups: int = 1

    def __post_init__(self) -> None:
        if not self.disk_sizes or any(s <= 0 for s in self.disk_sizes):
            raise ValueError("a workload needs disks of more than 0 bytes")
        if not (math.isfinite(self.change_rate) and self.change_rate >= 0):
            raise ValueError("the change rate must be a finite number >= 0")
        if not (math.isfinite(self.compression) and self.compression >= 1):
            raise ValueError("the compression ratio must be >= 1")
        if self.groups < 1:
            raise ValueError("at least one group")

    @property
    def total_size(self) -> int:
        return sum(self.disk_sizes)

    @property
    def total_allocated(self) -> int:
        return self.total_size if self.allocated is None else self.allocated


def cycle_window(rpo: float) -> float:
    """The shipper cuts a group once its oldest change is RPO/2 old
    (vrfs/shipper.py ``_due_groups``), so a cycle holds RPO/2 of changes and
    must be committed within the next RPO/2: the data lost at the worst
    moment is then the cycle's window plus its transfer, at most the RPO."""
    return rpo / 2


def data_per_cycle(w: Workload, window: float) -> float:
    """Changed bytes a cycle covering ``window`` seconds carries, before
    compression: the rate times the window, but never more than every block
    of every disk."""
    return min(w.change_rate * window, float(w.total_size))


def overhead(w: Workload, rtt: float) -> float:
    """Seconds of each window no block travels: the commit round trip of each
    group's cycle (the shipper sends groups one after another)."""
    return w.groups * rtt


def needed_rate(w: Workload, rpo: float, rtt: float = 0.0) -> float:
    """Bytes per second on the wire that hold ``rpo``; math.inf when the
    round trips alone take the whole window."""
    window = cycle_window(rpo)
    budget = window - overhead(w, rtt)
    wire = data_per_cycle(w, window) / w.compression
    if budget <= 0:
        return math.inf
    return wire / budget


def shortest_rpo(w: Workload, link: float, rtt: float = 0.0) -> float:
    """The shortest RPO ``link`` (bytes per second) holds; math.inf if none.

    With W = RPO/2, a = rate/compression, S = size/compression and k the
    overhead, the link holds W when min(a·W, S) <= link·(W - k). Below
    W = size/rate the left side grows as a·W: if link > a, every
    W >= link·k / (link - a) holds. Beyond, it is the constant S: every
    W >= S/link + k holds (a whole copy of every disk per cycle)."""
    if link <= 0:
        return math.inf
    a = w.change_rate / w.compression
    k = overhead(w, rtt)
    saturated = w.total_size / w.change_rate if w.change_rate > 0 else math.inf
    if link > a:
        window = link * k / (link - a)
        if window <= saturated:
            return 2 * window
    return 2 * max(saturated, w.total_size / w.compression / link + k)


@dataclass(frozen=True)
class Row:
    rpo: float
    window: float  # seconds of changes one cycle carries
    data: float  # changed bytes per cycle, before compression
    wire: float  # bytes per cycle on the wire
    needed: float  # bytes per second on the wire; math.inf: cannot be held at any rate
    link: float | None
    meets: bool | None  # None without a link

    @property
    def spare(self) -> float | None:
        """Link rate left (negative: missing), bytes per second."""
        return None if self.link is None else self.link - self.needed


def plan_rows(w: Workload, rpos: list[float] | tuple[float, ...], link: float | None = None,
              rtt: float = 0.0) -> list[Row]:
    rows = []
    for rpo in sorted(set(rpos)):
        window = cycle_window(rpo)
        data = data_per_cycle(w, window)
        needed = needed_rate(w, rpo, rtt)
        rows.append(Row(rpo, window, data, data / w.compression, needed, link,
                        None if link is None else needed <= link))
    return rows


def initial_sync_seconds(w: Workload, link: float, while_writing: bool = False) -> float:
    """Allocated size / compression / link. ``while_writing``: the link also
    carries the change rate meanwhile, so only what is left of it syncs
    (math.inf when nothing is left)."""
    rate = link - (w.change_rate / w.compression if while_writing else 0.0)
    if rate <= 0:
        return math.inf
    return w.total_allocated / w.compression / rate


def mbit(rate: float) -> float:
    """Bytes per second -> Mbit/s (decimal, as links are sold)."""
    return rate * BITS / 1e6
