"""Which points in time a store keeps: a pure function of the points and the
policy, like borg's prune, so it can be tested without a store.

A policy is a list of SPAN:EVERY rules, e.g. ``1h:5m,1d:1h,7d:1d``: among the
points cut within SPAN of now, one per EVERY (the newest in each EVERY-long
slot of the clock). The newest point is always kept. The empty policy keeps
the newest point only.
"""

from __future__ import annotations

from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import parse_duration

Policy = tuple[tuple[float, float], ...]  # (span, every) in seconds


def parse_policy(text: str) -> Policy:
    if not text.strip():
        return ()
    rules = []
    for part in text.split(","):
        span_text, sep, every_text = part.strip().partition(":")
        if not sep:
            raise UserError(f"bad retention policy {text!r}: {part.strip()!r} is not SPAN:EVERY "
                            "(e.g. 1h:5m,1d:1h,7d:1d)", EXIT_USAGE)
        span = parse_duration(span_text, "retention span")
        every = parse_duration(every_text, "retention interval")
        if every > span:
            raise UserError(f"bad retention policy {text!r}: in {part.strip()!r} the interval is longer "
                            "than the span", EXIT_USAGE)
        rules.append((span, every))
    return tuple(rules)


def format_policy(policy: Policy) -> str:
    return ",".join(f"{_dur(s)}:{_dur(e)}" for s, e in policy) or "newest only"


def retained(points: list[tuple[int, float]], policy: Policy, now: float) -> set[int]:
    """The ids of the points (id, cut time) the policy keeps at ``now``."""
    if not points:
        return set()
    keep = {max(points, key=lambda p: (p[1], p[0]))[0]}
    for span, every in policy:
        newest_in_slot: dict[int, tuple[float, int]] = {}
        for point_id, cut in points:
            if now - cut > span:
                continue
            slot = int(cut // every)
            if slot not in newest_in_slot or (cut, point_id) > newest_in_slot[slot]:
                newest_in_slot[slot] = (cut, point_id)
        keep |= {point_id for _, point_id in newest_in_slot.values()}
    return keep


def _dur(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
