"""`vrfs plan`: what bandwidth a change rate needs at each RPO, whether a link
holds it, and how long the initial sync takes. The figures come from the
operator (--disk, --change-rate) or from a running mount (--measure), the
model from vrfs/plan.py (docs/plan.md)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from vrfs import plan
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import MAX_SIZE, format_size, parse_duration, parse_size
from vrfs.settings import PARSERS

DEFAULT_MEASURE = 60.0
MIN_MEASURE, MAX_MEASURE = 1.0, 86400.0
MAX_RTT = 10.0
MIN_SHIPPED_FOR_RATIO = 1 << 20  # below this, a measured compression ratio says little

_TIME_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_BYTE_PREFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BIT_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z%]*)\s*(?:/\s*([A-Za-z]+))?\s*")
_RATE_HELP = "e.g. 5M/s, 200G/d, 100Mbit/s, 1Gbps"
LONGEST_SHOWN = 100 * 365 * 86400  # seconds; a plan that takes longer says so, not how much longer


def parse_rate(text: str, what: str, total_size: int | None = None) -> float:
    """A data rate -> bytes per second.

    Bytes: a number, an optional K/M/G/T (binary, as every size in vrfs: 1M is
    1 MiB) and an optional B or iB, then /s, /m (or /min), /h or /d: 5M/s,
    5MB/s, 200G/d. Bits, decimal as links are sold: 100Mbit/s, 1Gbps.
    ``total_size`` given: also a percentage of it, 2%/h. "Mb" is refused as
    ambiguous."""
    m = _RATE.fullmatch(text)
    percent_help = ", 2%/h of the disks' size" if total_size is not None else ""
    if not m:
        raise UserError(f"bad {what} {text!r}: expected an amount per time, {_RATE_HELP}{percent_help}", EXIT_USAGE)
    number, unit, per = float(m.group(1)), m.group(2), m.group(3)
    if unit.lower().endswith("bps"):
        if per is not None:
            raise UserError(f"bad {what} {text!r}: {unit} is already per second", EXIT_USAGE)
        unit, per = unit[:-3] + "bit", "s"
    if per is None or per.lower() not in _TIME_UNITS:
        raise UserError(f"bad {what} {text!r}: expected a time after '/': s, m, h or d ({_RATE_HELP})", EXIT_USAGE)
    seconds = _TIME_UNITS[per.lower()]
    if unit == "%":
        if total_size is None:
            raise UserError(f"bad {what} {text!r}: a percentage is a change rate, not a {what}", EXIT_USAGE)
        if number > 1e6:
            raise UserError(f"bad {what} {text!r}: too large", EXIT_USAGE)
        amount = number / 100 * total_size
    elif unit.lower().endswith(("bit", "bits")):
        prefix = unit.lower().removesuffix("s").removesuffix("bit")
        if prefix not in _BIT_PREFIX:
            raise UserError(f"bad {what} {text!r}: unknown unit {unit!r} ({_RATE_HELP})", EXIT_USAGE)
        amount = number * _BIT_PREFIX[prefix] / 8
    else:
        u = re.fullmatch(r"([KMGTkmgt]?)(B|iB)?", unit)
        if not u:
            n = m.group(1)
            hint = (f": write {n}{unit[:-1]}bit/{per} for bits or {n}{unit[:-1]}B/{per} for bytes"
                    if unit.endswith("b") else f" ({_RATE_HELP})")
            raise UserError(f"bad {what} {text!r}: unknown unit {unit!r}{hint}", EXIT_USAGE)
        amount = number * _BYTE_PREFIX[u.group(1).lower()]
    rate = amount / seconds
    if not math.isfinite(rate) or rate > MAX_SIZE:
        raise UserError(f"bad {what} {text!r}: too large", EXIT_USAGE)
    return rate


def parse_compression(text: str) -> float:
    """'2', '2.5', '2x', '3:1' -> the ratio of data to what travels, 1..100."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:x|:\s*1)?\s*", text)
    if not m:
        raise UserError(f"bad compression ratio {text!r}: expected a number such as 2, 2.5x or 3:1", EXIT_USAGE)
    ratio = float(m.group(1))
    if not 1 <= ratio <= 100:
        raise UserError(f"bad compression ratio {text!r}: must be from 1 (incompressible) to 100", EXIT_USAGE)
    return ratio


def parse_rtt(text: str) -> float:
    """'40ms', '0.04s', '0' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", text)
    if not m or (m.group(2) is None and float(m.group(1)) != 0):
        raise UserError(f"bad RTT {text!r}: expected a time in ms or s, e.g. 40ms", EXIT_USAGE)
    rtt = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    if rtt > MAX_RTT:
        raise UserError(f"bad RTT {text!r}: more than {MAX_RTT:g} s is no network round trip", EXIT_USAGE)
    return rtt


def parse_rpos(values: list[str] | None) -> list[float]:
    if not values:
        return list(plan.DEFAULT_RPOS)
    rpos = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                raise UserError(f"bad RPO list {value!r}: an empty item", EXIT_USAGE)
            try:  # the RPOs a mount accepts (vrfs/settings.py): 1 s to a year
                rpos.append(PARSERS["rpo"](item.strip()))
            except ValueError as exc:
                raise UserError(f"--rpo: {exc}", EXIT_USAGE) from None
    return rpos


def _disk_sizes(args) -> list[int]:
    sizes = []
    for text in args.disk or []:
        size = parse_size(text, "disk size")
        if size == 0:
            raise UserError(f"bad disk size {text!r}: must be more than 0", EXIT_USAGE)
        sizes.append(size)
    if args.disks is not None or args.size is not None:
        if args.disks is None or args.size is None:
            raise UserError("--disks N and --size SIZE go together (or give each disk with --disk SIZE)", EXIT_USAGE)
        try:
            count = int(args.disks)
        except ValueError:
            raise UserError(f"bad number of disks {args.disks!r}", EXIT_USAGE) from None
        if not 1 <= count <= 100_000:
            raise UserError(f"bad number of disks {args.disks!r}: must be 1..100000", EXIT_USAGE)
        size = parse_size(args.size, "disk size")
        if size == 0:
            raise UserError(f"bad disk size {args.size!r}: must be more than 0", EXIT_USAGE)
        sizes += [size] * count
    return sizes


# ----------------------------------------------------------- measurement

def measure(mountpoint: str, seconds: float, say=None) -> dict:
    """Sample a running mount twice, ``seconds`` apart. The changed data is the
    growth of each disk's count of blocks newly marked dirty (blocks_newly_dirty
    of its status): a block counts once per cycle however often it is rewritten,
    which is what the shipper sends. The compression ratio is the block bytes
    shipped over the bytes on the wire meanwhile, when enough was shipped."""
    from vrfs.mountinfo import is_fuse_mount
    from vrfs.status import mount_status
    mp = os.path.abspath(mountpoint)
    if not is_fuse_mount(mp):
        raise UserError(f"{mountpoint} is not a vrfs mount", EXIT_USAGE)
    first = mount_status(mp)
    if not first.get("tracking", True):
        raise UserError(f"{mountpoint} is mounted without change tracking (--no-tracking): there is nothing to measure")
    if any("blocks_newly_dirty" not in d for d in first["disks"]):
        raise UserError(f"the vrfs daemon of {mountpoint} does not count changed blocks (an older vrfs): "
                        "remount it with this version to measure")
    start = time.monotonic()
    if say:
        say(f"measuring {mp} for {_fmt_duration(seconds)}...")
    time.sleep(seconds)
    last = mount_status(mp)
    elapsed = time.monotonic() - start
    if last["pid"] != first["pid"]:
        raise UserError(f"the vrfs daemon of {mountpoint} restarted during the measurement: measure again")
    before = {d["disk_id"]: d for d in first["disks"]}
    changed = shipped = sent = dirty_at_start = 0
    blocks = 0
    sizes, allocated, groups = [], 0, set()
    for d in last["disks"]:
        was = before.get(d["disk_id"], {})
        new_blocks = max(0, d.get("blocks_newly_dirty", 0) - was.get("blocks_newly_dirty", 0))
        blocks += new_blocks
        changed += new_blocks * d["block_size"]
        shipped += max(0, d.get("bytes_dirty_shipped", 0) - was.get("bytes_dirty_shipped", 0))
        sent += max(0, d.get("bytes_sent", 0) - was.get("bytes_sent", 0))
        dirty_at_start += was.get("dirty_blocks", 0)
        if d["size"] > 0:
            sizes.append(d["size"])
            allocated += _allocated(os.path.join(mp, d["path"]), d["size"])
            groups.add(d["group"])
    ratio = max(1.0, shipped / sent) if sent > 0 and shipped >= MIN_SHIPPED_FOR_RATIO else None
    shipping = bool(last.get("peer")) and bool(last.get("connected"))
    rpo = next((d["rpo_seconds"] for d in last["disks"] if d.get("rpo_seconds")), None)
    if shipping and rpo:
        merged = (f"a block rewritten within one cycle of this mount (one every {_fmt_duration(rpo / 2)} "
                  "at most, sooner under a heavy load) counted once")
    elif dirty_at_start:
        merged = (f"{mountpoint} does not ship (no --peer, or not connected), so nothing is cleared: a block "
                  f"rewritten within the sample counted once, and the {dirty_at_start} blocks dirty before the "
                  "sample not at all when rewritten (a lower bound if the VMs rewrite them)")
    else:
        merged = "a block rewritten within the sample counted once"
    return {
        "mountpoint": mp,
        "seconds": round(elapsed, 3),
        "changed_blocks": blocks,
        "changed_bytes": changed,
        "bytes_per_second": changed / elapsed,
        "shipped_bytes": shipped,
        "wire_bytes": sent,
        "compression": ratio,
        "shipping": shipping,
        "disk_sizes": sizes,
        "allocated_bytes": allocated,
        "groups": len(groups),
        "note": merged,
    }


def _allocated(path: str, size: int) -> int:
    try:
        return min(os.stat(path).st_blocks * 512, size)
    except OSError:
        return size


# ----------------------------------------------------------- the command

def plan_main(args) -> int:
    if args.measure_for is not None and not args.measure:
        raise UserError("--for is the sampling time of --measure MOUNTPOINT", EXIT_USAGE)
    if not args.measure and args.change_rate is None:
        raise UserError("plan needs a change rate: --change-rate RATE or --measure MOUNTPOINT", EXIT_USAGE)
    sizes = _disk_sizes(args)
    if not sizes and not args.measure:
        raise UserError("plan needs the disks: --disk SIZE (repeatable) or --disks N --size SIZE", EXIT_USAGE)
    rpos = parse_rpos(args.rpo)
    link = parse_rate(args.link, "link rate") if args.link is not None else None
    if link is not None and link <= 0:
        raise UserError(f"bad link rate {args.link!r}: must be more than 0", EXIT_USAGE)
    rtt = parse_rtt(args.rtt) if args.rtt is not None else 0.0
    compression = parse_compression(args.compression) if args.compression is not None else None
    seconds = DEFAULT_MEASURE
    if args.measure_for is not None:
        seconds = parse_duration(args.measure_for, "sampling time")
        if not MIN_MEASURE <= seconds <= MAX_MEASURE:
            raise UserError(f"bad sampling time {args.measure_for!r}: must be from 1s to 1d", EXIT_USAGE)
    rate = parse_rate(args.change_rate, "change rate", sum(sizes)) if args.change_rate is not None else 0.0

    measured = None
    if args.measure:
        measured = measure(args.measure, seconds, say=lambda line: print(line, file=sys.stderr, flush=True))
        rate = measured["bytes_per_second"]
        if not sizes:
            sizes = measured["disk_sizes"]
            if not sizes:
                raise UserError(f"{args.measure} holds no disks (no files with data): give them with --disk SIZE")
    if compression is not None:
        ratio, ratio_basis = compression, "given"
    elif measured and measured["compression"] is not None:
        ratio, ratio_basis = measured["compression"], "measured"
    else:
        ratio, ratio_basis = plan.DEFAULT_COMPRESSION, "assumed"
    from_mount = measured is not None and not (args.disk or args.disks)
    workload = plan.Workload(
        tuple(sizes), rate, ratio, distinct=measured is not None,
        allocated=measured["allocated_bytes"] if from_mount and measured else None,
        groups=(measured["groups"] if from_mount and measured else len(sizes)) or 1)
    report = build_report(workload, rpos, link, rtt, ratio_basis, measured)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def build_report(w: plan.Workload, rpos: list[float], link: float | None, rtt: float,
                 ratio_basis: str, measured: dict | None = None) -> dict:
    rows = plan.plan_rows(w, rpos, link, rtt)
    verdicts = []
    link_text = _fmt_rate(link) if link is not None else ""
    for r in rows:
        if link is None or r.meets:
            continue
        if math.isinf(r.needed):
            verdicts.append(f"no link can hold an RPO of {_fmt_duration(r.rpo)}: the commit round trips of "
                            f"{w.groups} group(s) at an RTT of {_fmt_duration(rtt)} take its whole cycle")
        else:
            verdicts.append(f"a {link_text} link cannot hold an RPO of {_fmt_duration(r.rpo)} for this change "
                            f"rate: it needs {_fmt_rate(r.needed)}")
    shortest = plan.shortest_rpo(w, link, rtt) if link is not None else None
    if shortest is not None:
        if shortest == 0:
            verdicts.append(f"a {link_text} link holds any RPO for this change rate "
                            "(give --rtt: the round trips set the limit then)")
        elif link is not None and link <= w.change_rate / w.compression and math.isfinite(shortest):
            verdicts.append(f"a {link_text} link is slower than the change rate "
                            f"({_fmt_rate(w.change_rate / w.compression)} on the wire): it holds only RPOs of "
                            f"{_fmt_duration(shortest)} and longer, where every cycle is a whole copy of every disk")
        elif math.isfinite(shortest):
            verdicts.append(f"the shortest RPO a {link_text} link holds for this change rate: "
                            f"{_fmt_duration(shortest)}")
    sync = plan.initial_sync_seconds(w, link) if link is not None else None
    sync_busy = plan.initial_sync_seconds(w, link, while_writing=True) if link is not None else None
    return {
        "disks": {"count": len(w.disk_sizes), "size_bytes": w.total_size,
                  "allocated_bytes": w.total_allocated, "groups": w.groups},
        "change_rate": {"bytes_per_second": w.change_rate,
                        "basis": "measured" if measured else "given",
                        "upper_bound": not w.distinct},
        "measurement": measured and {k: v for k, v in measured.items() if k != "disk_sizes"},
        "compression": {"ratio": w.compression, "basis": ratio_basis},
        "link": None if link is None else {"bytes_per_second": link, "mbit_per_second": plan.mbit(link)},
        "rtt_seconds": rtt,
        "rpos": [{
            "rpo_seconds": r.rpo,
            "cycle_seconds": r.window,
            "bytes_per_cycle": r.data,
            "wire_bytes_per_cycle": r.wire,
            "needed_bytes_per_second": _finite(r.needed),
            "needed_mbit_per_second": _finite(plan.mbit(r.needed)),
            "meets": r.meets,
            "spare_mbit_per_second": None if r.spare is None else _finite(plan.mbit(r.spare)),
        } for r in rows],
        "shortest_rpo_seconds": None if shortest is None else _finite(shortest),
        "initial_sync_seconds": None if sync is None else _finite(sync),
        "initial_sync_while_writing_seconds": None if sync_busy is None else _finite(sync_busy),
        "verdicts": verdicts,
    }


def print_report(rep: dict) -> None:
    disks, cr, comp, link = rep["disks"], rep["change_rate"], rep["compression"], rep["link"]
    alloc = (f" ({format_size(disks['allocated_bytes'])} allocated)"
             if disks["allocated_bytes"] != disks["size_bytes"] else "")
    print(f"disks:        {disks['count']}, {format_size(disks['size_bytes'])} in all{alloc}, "
          f"{disks['groups']} group(s)")
    rate = f"{format_size(cr['bytes_per_second'])}/s of changed blocks"
    if cr["basis"] == "measured":
        m = rep["measurement"]
        print(f"change rate:  {rate}, measured: {format_size(m['changed_bytes'])} in "
              f"{_fmt_duration(m['seconds'])} ({m['note']})")
    else:
        print(f"change rate:  {rate}, given: an upper bound (rewrites of a block within a cycle travel once)")
    why = {"given": "given", "measured": "measured: block bytes shipped / bytes on the wire",
           "assumed": "assumed; --compression RATIO, or --measure a replicating mount"}[comp["basis"]]
    print(f"compression:  {comp['ratio']:.2f}:1 ({why})")
    link_rate = link["bytes_per_second"] if link else None
    rtt = f", RTT {_fmt_duration(rep['rtt_seconds'])}" if rep["rtt_seconds"] else ""
    print(f"link:         {_fmt_rate(link_rate) if link else 'not given (--link RATE)'}{rtt}")
    print("model:        a cycle carries RPO/2 of changes and must be committed within the next RPO/2 "
          "(docs/plan.md)")
    print()
    meets_head = f"MEETS {_fmt_rate(link_rate)}" if link else ""
    print(f"{'RPO':>8} {'CYCLE':>8} {'DATA/CYCLE':>11} {'ON WIRE':>9} {'NEEDS':>14}  {meets_head}".rstrip())
    for r in rep["rpos"]:
        needs = "-" if r["needed_mbit_per_second"] is None else _fmt_mbit(r["needed_mbit_per_second"])
        meets = ""
        if r["meets"] is not None:
            if r["needed_mbit_per_second"] is None:
                meets = "NO (round trips take the whole cycle)"
            elif r["meets"]:
                meets = f"yes, {_fmt_mbit(r['spare_mbit_per_second'])} spare"
            else:
                meets = f"NO, {_fmt_mbit(-r['spare_mbit_per_second'])} short"
        print(f"{_fmt_duration(r['rpo_seconds']):>8} {_fmt_duration(r['cycle_seconds']):>8} "
              f"{format_size(r['bytes_per_cycle']):>11} {format_size(r['wire_bytes_per_cycle']):>9} "
              f"{needs:>14}  {meets}".rstrip())
    print()
    for v in rep["verdicts"]:
        print(v[0].upper() + v[1:] + ".")
    if link:
        sync, busy = rep["initial_sync_seconds"], rep["initial_sync_while_writing_seconds"]
        line = (f"Initial sync: {format_size(disks['allocated_bytes'])} / {comp['ratio']:.2f} over "
                f"{_fmt_rate(link_rate)}: {_fmt_duration(sync) if sync is not None else 'never'}")
        line += (f" ({_fmt_duration(busy)} while the VMs keep changing {format_size(cr['bytes_per_second'])}/s)"
                 if busy is not None else
                 f" (never while the VMs keep changing {format_size(cr['bytes_per_second'])}/s: "
                 "that alone fills the link)")
        print(line + ".")
    else:
        print("Give --link RATE to see which RPOs a link holds and how long the initial sync takes.")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt_mbit(mbit: float) -> str:
    if mbit < 0.01:  # a link slower than 10 kbit/s still gets a figure, not 0.00
        return f"{mbit * 1000:.2g} kbit/s" if mbit >= 0.001 else f"{mbit * 1e6:.2g} bit/s"
    if mbit >= 100:
        return f"{mbit:,.0f} Mbit/s"
    if mbit >= 1:
        return f"{mbit:.1f} Mbit/s"
    return f"{mbit:.2f} Mbit/s"


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else _fmt_mbit(plan.mbit(rate))


def _fmt_duration(seconds: float) -> str:
    """30s, 1m30s, 2h5m, 3d4h; ms below a second."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds > LONGEST_SHOWN:
        return f"over {LONGEST_SHOWN // (365 * 86400)} years"
    s = round(seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if s >= size or unit == "s":
            text = f"{s // size}{unit}"
            if i + 1 < len(units) and (s % size) // units[i + 1][1]:
                text += f"{(s % size) // units[i + 1][1]}{units[i + 1][0]}"
            return text
    raise AssertionError(seconds)
