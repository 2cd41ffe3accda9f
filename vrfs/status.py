"""`vrfs status`: the disks of a mounted datastore, or of a DR-site store."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from vrfs import control
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import format_size as human_size
from vrfs.parse import parse_duration, printable
from vrfs.mountinfo import ANSWER_TIMEOUT, control_path_of

MIN_INTERVAL = 0.2  # seconds between redraws of --watch


def mount_status(mountpoint: str, ranges: bool = False) -> dict:
    path = control_path_of(mountpoint)
    try:
        answer = control.ask(path, {"op": "status", "ranges": ranges}, timeout=ANSWER_TIMEOUT)
    except TimeoutError:
        raise UserError(f"{mountpoint}: the vrfs daemon does not answer within {ANSWER_TIMEOUT:g} s "
                        "(look at its log)") from None
    except OSError as exc:
        raise UserError(f"cannot reach the vrfs daemon of {mountpoint}: {exc.strerror or exc}") from None
    except ValueError:
        raise UserError(f"{mountpoint}: the vrfs daemon gave no answer (look at its log)") from None
    if "error" in answer:
        raise UserError(answer["error"])
    return answer


def status_main(args) -> int:
    if args.store and args.mountpoint:
        raise UserError("give either MOUNTPOINT or --store, not both", EXIT_USAGE)
    if not args.store and not args.mountpoint:
        raise UserError("status needs a MOUNTPOINT or --store URL", EXIT_USAGE)
    if args.watch and args.json:
        raise UserError("--watch redraws the table; not with --json", EXIT_USAGE)
    interval = parse_duration(args.interval, "--interval")
    if interval < MIN_INTERVAL:
        raise UserError(f"--interval {args.interval}: at least {MIN_INTERVAL:g}s (each redraw asks the daemon, "
                        "whose loop also serves the datastore)", EXIT_USAGE)
    if not args.watch:
        text = _once(args)
        if text:
            print(text)
        return 0
    return _watch(args, interval)


def _once(args) -> str:
    """What one `vrfs status` prints."""
    if args.store:
        from vrfs.store import store_status
        disks = store_status(args.store)
        if args.json:
            return json.dumps(disks, indent=2)
        return "\n".join(render_store(disks))
    status = mount_status(os.path.abspath(args.mountpoint), ranges=args.blocks)
    if args.json:
        return json.dumps(status["disks"], indent=2)
    return "\n".join(render_mount(status))


def _watch(args, interval: float) -> int:
    """Redraw until Ctrl-C; a daemon that stops answering is said at the top, and asked again."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                text = _once(args)
            except UserError as exc:
                text = f"vrfs: {exc}"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}every {interval:g}s, Ctrl-C to stop  {stamp}\n{text}\n")
            if not clear:
                sys.stdout.write("\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------ rendering

STATE_ORDER = ("fenced", "diverged", "refused", "disconnected", "full-sync", "syncing", "in-sync")
BAR = 24


def render_mount(status: dict, width: int | None = None) -> list[str]:
    """The human `vrfs status` of a mounted datastore: a line about the link,
    a table of groups (when it replicates), and a table of disks, each with
    what keeps it from being in sync on the lines under it."""
    width = width or _terminal_width()
    out = [f"{printable(status['source'])} at {printable(status['mountpoint'])} (pid {status['pid']}, "
           f"block size {status['block_size'] // 1024}K)"]
    disks = [_shown(d) for d in status["disks"]]
    if status.get("peer"):
        link = status.get("link") if status["connected"] else None
        out.append(f"replicating as {printable(status['name'])} to {status['peer']} "
                   f"({'connected, ' + link if link else 'connected' if status['connected'] else 'not connected'})")
        if status.get("bwlimit"):
            bw = status["bwlimit"]
            out.append(f"    bandwidth limit {bw['schedule']}: now {bw['rate']}")
        if status.get("insecure") and not link:
            out.append("    INSECURE: plain TCP (--insecure): anyone on the path can read and write the replicas")
        out += _group_table(disks)
    pw = max(4, min(max((len(d["path"]) for d in disks), default=4), width - 54))
    out.append(f"{'PATH':<{pw}} {'SIZE':>6} {'DIRTY':>6} {'STATE':<14} {'LAG/RPO':>16} {'SENT':>6}")
    for d in disks:
        state = d["state"]
        if "progress" in d and "sync_phase" not in d and state == "full-sync":
            state = f"{state} {d['progress'] * 100:.0f}%"
        elif "sync_phase" in d:
            state = f"{state} {_phase_fraction(d) * 100:.0f}%"
        row = (f"{human_size(d['size']):>6} {human_size(d['dirty_bytes']):>6} {state:<14} "
               f"{_lag(d):>16} {human_size(d['bytes_sent']) if 'bytes_sent' in d else '-':>6}")
        if len(d["path"]) > pw:  # a long path on a line of its own, the columns stay in place under it
            out += [d["path"], f"{'':<{pw}} {row}"]
        else:
            out.append(f"{d['path']:<{pw}} {row}")
        if "sync_phase" in d:
            out.append("    " + _bar(d))
        for why in _why(d):
            out.append(f"    {why}")
        if d.get("warning"):
            out.append(f"    warning: {d['warning']}")
        found = d.get("verify")
        if found and found["state"] != "ok":
            out.append(f"    last verify ({_fmt_time(found['finished'])}): {found['state']}"
                       + (f", {found['differing']} blocks differed" if found["differing"] else ""))
    return out


def _shown(disk: dict) -> dict:
    """The disk with its names, and the texts that quote them, as `ls -b` shows
    them: a newline in a file name must not start a row of its own."""
    shown = dict(disk)
    for key in ("path", "group", "source", "reason", "error", "warning"):
        if isinstance(disk.get(key), str):
            shown[key] = printable(disk[key])
    return shown


def _group_table(disks: list[dict]) -> list[str]:
    """One row per group: the worst state of its disks, then what is the group's (lag, point, rate, ETA)."""
    groups: dict[str, list[dict]] = {}
    for d in disks:
        groups.setdefault(d.get("group") or d["path"].split("/", 1)[0], []).append(d)
    if not groups:
        return []
    out = [f"{'GROUP':<14} {'STATE':<12} {'LAG/RPO':>16} {'POINT':>6} {'AGE':>6} {'RATE':>9} {'ETA':>6}"]
    for name, members in sorted(groups.items()):
        d = members[0]  # group-level fields are the same on each of its disks
        states = [m["state"] for m in members]
        state = min(states, key=lambda s: STATE_ORDER.index(s) if s in STATE_ORDER else -1)
        point = d.get("last_point") or {}
        rate = d.get("rate_bytes_per_second")
        etas = [m["eta_seconds"] for m in members if m.get("eta_seconds") is not None]
        label = name if len(name) <= 14 else name[:13] + "~"
        out.append(f"{label:<14} {state:<12} {_lag(d):>16} {point.get('id', '-'):>6} "
                   f"{_duration(d.get('point_age_seconds')):>6} "
                   f"{human_size(rate) + '/s' if rate is not None else '-':>9} "
                   f"{_duration(max(etas)) if etas else '-':>6}")
    return out


def _lag(d: dict) -> str:
    if "lag_seconds" not in d:
        return "-"
    text = _duration(d["lag_seconds"])
    if d.get("rpo_seconds"):
        text += "/" + _duration(d["rpo_seconds"], short=True)
    if d.get("rpo_violated", d.get("rpo_seconds") and d["lag_seconds"] > d["rpo_seconds"]):
        text += " RPO!"
    elif d.get("rpo_breach_predicted"):
        text += " RPO?"
    return text


def _phase_fraction(d: dict) -> float:
    if d.get("sync_phase") == "sending":
        return float(d.get("cycle_progress") or 0.0)
    return float(d.get("progress") or 0.0)


def _bar(d: dict) -> str:
    """A full sync's progress: the comparison with the DR site's copy, then the cycle that sends what differs."""
    fraction = min(max(_phase_fraction(d), 0.0), 1.0)
    filled = int(fraction * BAR)
    text = f"[{'#' * filled}{'.' * (BAR - filled)}] {fraction * 100:3.0f}% {d['sync_phase']}"
    if d["sync_phase"] == "sending" and d.get("rate_bytes_per_second") is not None:
        text += f" at {human_size(d['rate_bytes_per_second'])}/s"
    if d.get("eta_seconds") is not None:
        text += f", ETA {_duration(d['eta_seconds'])}"
    return text


def render_store(disks: list[dict], width: int | None = None) -> list[str]:
    width = width or _terminal_width()
    disks = [_shown(d) for d in disks]
    pw = max(4, min(max((len(d["path"]) for d in disks), default=4), width - 58))
    out = [f"{'SOURCE':<12} {'PATH':<{pw}} {'SIZE':>7} {'STATE':<11} {'POINT':>7}  CUT"]
    for d in disks:
        point = d.get("point") or {}
        cut = point.get("cut_time")
        out.append(f"{d['source']:<12} {d['path']:<{pw}} {human_size(d['size']):>7} {d['state']:<11} "
                   f"{point.get('id', '-'):>7}  {_fmt_time(cut, short=True)}")
        if d.get("error"):
            out.append(f"    {d['error']}")
    return out


def _duration(seconds: float | None, short: bool = False) -> str:
    """Compact: 7s, 12m05s, 3h05m, 2d03h; short drops a zero second part (5m, 1h)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        text = f"{s // 60}m{s % 60:02d}s"
    elif s < 86400:
        text = f"{s // 3600}h{s % 3600 // 60:02d}m"
    else:
        text = f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return text[:-3] if short and text.endswith(("00s", "00m", "00h")) else text


def _terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _why(disk: dict) -> list[str]:
    """What keeps a disk from being in sync, for the line(s) under it: why it needs
    a full sync (reason), and what the link or the receiver said (error)."""
    if disk["state"] == "in-sync":
        return []
    found = [disk[key] for key in ("reason", "error") if disk.get(key)]
    if not found:
        found = [{"disconnected": "not connected to the DR site",
                  "refused": "the receiver refused the last cycle",
                  "fenced": "the DR site failed this group over: its source is refused",
                  "diverged": "the DR site holds a newer history of this group (split brain)",
                  }.get(disk["state"], "")]
    return [why for i, why in enumerate(found) if why and why not in found[:i]]


def _fmt_time(t, short: bool = False) -> str:
    """Local time; short: the time alone when it is today (a column of 8 to 19 characters)."""
    if not t:
        return "-"
    if short and time.strftime("%Y-%m-%d", time.localtime(t)) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", time.localtime(t))
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
