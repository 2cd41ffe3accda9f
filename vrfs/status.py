"""`vrfs status`: the disks of a mounted datastore, or of a DR-site store."""

from __future__ import annotations

import json
import os

from vrfs import control
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import format_size as human_size
from vrfs.mountinfo import ANSWER_TIMEOUT, control_path_of


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
    if args.store:
        if args.mountpoint:
            raise UserError("give either MOUNTPOINT or --store, not both", EXIT_USAGE)
        from vrfs.store import store_status
        disks = store_status(args.store)
        if args.json:
            print(json.dumps(disks, indent=2))
            return 0
        print(f"{'SOURCE':<16} {'PATH':<40} {'SIZE':>9} {'STATE':<11} {'POINT':>7}  CUT")
        for d in disks:
            point = d.get("point") or {}
            print(f"{d['source']:<16} {d['path']:<40} {human_size(d['size']):>9} {d['state']:<11} "
                  f"{point.get('id', '-'):>7}  {_fmt_time(point.get('cut_time'))}")
            if d.get("error"):
                print(f"    {d['error']}")
        return 0
    if not args.mountpoint:
        raise UserError("status needs a MOUNTPOINT or --store URL", EXIT_USAGE)
    status = mount_status(os.path.abspath(args.mountpoint), ranges=args.blocks)
    if args.json:
        print(json.dumps(status["disks"], indent=2))
        return 0
    print(f"{status['source']} at {status['mountpoint']} (pid {status['pid']}, "
          f"block size {status['block_size'] // 1024}K)")
    if status.get("peer"):
        link = status.get("link") if status["connected"] else None
        print(f"replicating as {status['name']} to {status['peer']} "
              f"({'connected, ' + link if link else 'connected' if status['connected'] else 'not connected'})")
        if status.get("bwlimit"):
            bw = status["bwlimit"]
            print(f"    bandwidth limit {bw['schedule']}: now {bw['rate']}")
        if status.get("insecure") and not link:
            print("    INSECURE: plain TCP (--insecure): anyone on the path can read and write the replicas")
    print(f"{'PATH':<36} {'SIZE':>8} {'DIRTY':>8} {'STATE':<16} {'LAG':>7} {'POINT':>6}  CUT")
    for d in status["disks"]:
        state = d["state"]
        if "progress" in d:
            state = f"{state} {d['progress'] * 100:.0f}%"
        elif d.get("rpo_seconds") and d.get("lag_seconds", 0) > d["rpo_seconds"]:
            state = f"{state} (RPO!)"
        point = d.get("last_point") or {}
        lag = f"{d['lag_seconds']:.0f}s" if "lag_seconds" in d else "-"
        print(f"{d['path']:<36} {human_size(d['size']):>8} {human_size(d['dirty_bytes']):>8} {state:<16} "
              f"{lag:>7} {point.get('id', '-'):>6}  {_fmt_time(point.get('cut_time'))}")
        for why in _why(d):
            print(f"    {why}")
        if d.get("warning"):
            print(f"    warning: {d['warning']}")
        found = d.get("verify")
        if found and found["state"] != "ok":
            print(f"    last verify ({_fmt_time(found['finished'])}): {found['state']}"
                  + (f", {found['differing']} blocks differed" if found["differing"] else ""))
    return 0


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


def _fmt_time(t) -> str:
    if not t:
        return "-"
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
