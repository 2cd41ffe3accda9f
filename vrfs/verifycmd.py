"""`vrfs verify`: asks the mount daemon to verify its replicas (vrfs/verify.py
does the work, in the daemon), shows progress, prints what differs.

Exit status: 0 every replica verifies, 1 something differs, 2 it could not
check (the link is down for longer than --wait, a disk was in a full sync).
"""

from __future__ import annotations

import json
import os
import sys
import time

from vrfs import control
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.mountinfo import control_path_of
from vrfs.parse import format_size as human_size, parse_duration, parse_size

EXIT_OK, EXIT_DIFFERS, EXIT_UNCHECKED = 0, 1, 2
POLL = 0.2


def _ask(path: str, request: dict) -> dict:
    try:
        answer = control.ask(path, request)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach the vrfs daemon: {getattr(exc, 'strerror', None) or exc}",
                        EXIT_UNCHECKED) from None
    if "error" in answer:
        raise UserError(answer["error"], EXIT_UNCHECKED)
    return answer


class Progress:
    """A bar on a terminal; otherwise a line every 10 %."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1
        self.started = time.monotonic()

    def show(self, job: dict, note: str = "") -> None:
        done, total = job["bytes_compared"], job["bytes_total"]
        frac = min(1.0, done / total) if total else 1.0
        rate = done / max(time.monotonic() - self.started, 1e-3)
        text = f"verifying {human_size(done)} of {human_size(total)} ({frac * 100:.0f}%, {human_size(rate)}/s){note}"
        if self.tty:
            width = 30
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            sys.stderr.write(f"\r[{bar}] {text}\x1b[K")
            sys.stderr.flush()
        elif int(frac * 10) != self.last_tenth:
            self.last_tenth = int(frac * 10)
            print(text, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def verify_main(args) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    rate = parse_size(args.rate, "rate")
    patience = parse_duration(args.wait, "--wait")
    for group in args.groups:
        if not group or "/" in group or group in (".", ".."):
            raise UserError(f"bad group {group!r}: a group is a top-level name in the datastore", EXIT_USAGE)
    path = control_path_of(mountpoint)
    started = _ask(path, {"op": "verify", "groups": args.groups, "repair": args.repair, "rate": rate})
    job_id = started["job"]
    progress = Progress()
    try:
        job = _follow(path, job_id, progress, patience)
    except KeyboardInterrupt:
        progress.end()
        _ask(path, {"op": "verify-pause"})
        print("vrfs: verify paused; the same command resumes it", file=sys.stderr)
        return 130
    progress.end()
    repaired = _wait_for_repair(path, job, patience) if args.repair else {}
    if args.json:
        print(json.dumps({**job, "repaired": repaired}, indent=2))
    else:
        _report(job, repaired)
    return {"ok": EXIT_OK, "differs": EXIT_DIFFERS}.get(job["result"], EXIT_UNCHECKED)


def _follow(path: str, job_id: str, progress: Progress, patience: float) -> dict:
    """Poll until the job finishes; give up if it makes no progress for ``patience``."""
    last_done, last_change = -1, time.monotonic()
    while True:
        state = _ask(path, {"op": "verify-status"})
        job = state.get("current")
        if not job or job["id"] != job_id:
            raise UserError("the verify was replaced by another one", EXIT_UNCHECKED)
        if job["finished"]:
            progress.show(job)
            return job
        note = "" if state["connected"] else f", waiting for the DR site: {state.get('link_error') or 'not connected'}"
        progress.show(job, note)
        if job["bytes_compared"] != last_done:
            last_done, last_change = job["bytes_compared"], time.monotonic()
        elif time.monotonic() - last_change > patience:
            progress.end()
            _ask(path, {"op": "verify-pause"})
            raise UserError(f"the verify made no progress for {patience:g} s"
                            + ("" if state["connected"] else f" (not connected: {state.get('link_error')})")
                            + "; paused, the same command resumes it", EXIT_UNCHECKED)
        time.sleep(POLL)


def _wait_for_repair(path: str, job: dict, patience: float) -> dict[str, int]:
    """After a verify with --repair: until every disk it found wrong is in sync
    at a newer point. Returns {path: point id}."""
    wrong = [p for p, d in job["disks"].items() if d["state"] in ("differs", "missing")]
    if not wrong:
        return {}
    print(f"repairing {len(wrong)} disk(s)...", file=sys.stderr, flush=True)
    before = {p: job["disks"][p]["point"] for p in wrong}
    deadline = time.monotonic() + max(patience, 60.0)
    while True:
        disks = {d["path"]: d for d in _ask(path, {"op": "status"})["disks"]}
        done = {}
        for p in wrong:
            d = disks.get(p)
            point = (d or {}).get("last_point") or {}
            if d is None or (d["state"] == "in-sync" and not d["dirty_blocks"]
                             and point.get("id", 0) > before.get(p, 0)):
                done[p] = point.get("id", 0)
        if len(done) == len(wrong):
            return done
        if time.monotonic() > deadline:
            raise UserError(f"the repair of {', '.join(sorted(set(wrong) - set(done)))} was not acknowledged "
                            "in time; `vrfs status` shows why", EXIT_UNCHECKED)
        time.sleep(POLL)


def _report(job: dict, repaired: dict[str, int]) -> None:
    for p, d in sorted(job["disks"].items()):
        line = f"{p}: {d['state']}"
        if d["state"] in ("ok", "differs"):
            line += f", {d['compared']} blocks compared"
            if d["skipped"]:
                line += f", {d['skipped']} written since the point (the next cycle carries them)"
        if d["differing"]:
            shown = ", ".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in d["ranges"][:8])
            more = ", ..." if len(d["ranges"]) > 8 else ""
            line += f"; {d['differing']} differ (blocks {shown}{more})"
        if d["note"]:
            line += f" ({d['note']})"
        if p in repaired:
            line += f"; repaired at point {repaired[p]}"
        print(line)
    verdict = {"ok": "every replica verifies", "differs": "replicas differ from the source",
               "incomplete": "some disks could not be checked"}.get(job["result"], job["result"])
    print(f"verify {job['id']}: {verdict}")
