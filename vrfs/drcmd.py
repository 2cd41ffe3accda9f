"""`vrfs points`, `vrfs test-failover`, `vrfs failover`: the DR site's commands.

They work whether or not `vrfs serve` runs on the store: if it does (the
store's lock is taken), the request goes to its control socket and is done
there with the group held; if not, the command takes the store's lock and
does it itself (vrfs/recovery.py either way). One line per thing done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from vrfs import control, recovery
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import format_size
from vrfs.store import Store, StoreError, StoreInUse, store_from_url
from vrfs.store.base import CONTROL_FILE
from vrfs.wire import ProtocolError, check_name

REQUEST_TIMEOUT = 24 * 3600.0  # a copy of large images takes its time; the server does the work


def _source_group(text: str) -> tuple[str, str]:
    source, sep, group = text.partition("/")
    try:
        if not sep:
            raise ProtocolError("expected SOURCE/GROUP")
        return check_name(source, "source name"), check_name(group, "group")
    except ProtocolError as exc:
        raise UserError(f"bad SOURCE/GROUP {text!r}: {exc}", EXIT_USAGE) from None


def _on_store(url: str, request: dict, direct: Callable[[Store], dict]) -> dict:
    try:
        store = store_from_url(url)
    except StoreError as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    if not store.state_dir.is_dir():
        raise UserError(f"{url} is not a vrfs store (no {store.state_dir})")
    try:
        store.open()
    except StoreInUse:
        return _ask_server(store, request)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    # A committed cycle that the command applies first must not cost a point
    # that `vrfs serve --retain` keeps, nor the point the replica was at: the
    # command does not know the server's policy, so it keeps every point, and
    # the next `vrfs serve` prunes by its own.
    store.policy = recovery.KEEP_EVERY_POINT
    # No server runs (its lock is ours): a control file left by one that was
    # killed would send another command to a socket nobody answers.
    (store.state_dir / CONTROL_FILE).unlink(missing_ok=True)
    try:
        return direct(store)
    finally:
        store.close()


def _ask_server(store: Store, request: dict) -> dict:
    try:
        path = (store.state_dir / CONTROL_FILE).read_text().strip()
    except FileNotFoundError:
        # The lock is held by another command working on the store without a
        # server (or by a server still recovering, before it listens).
        raise UserError(f"{store.url} is in use by another vrfs command (a failover, a test failover, a "
                        "reprotect) or a vrfs serve still starting; run this one again when it has finished"
                        ) from None
    except OSError as exc:
        raise UserError(f"{store.url} is in use, and its control socket cannot be read ({exc})") from None
    try:
        answer = control.ask(path, request, timeout=REQUEST_TIMEOUT)
    except ValueError:  # the connection ended without an answer
        raise UserError(f"the vrfs serve of {store.url} ended before it answered; run the same command again "
                        "(an interrupted failover is finished by it)") from None
    except OSError as exc:
        raise UserError(f"{store.url} is in use by a vrfs serve that does not answer ({exc.strerror or exc}), or "
                        "by another vrfs command; run this one again when it has finished") from None
    if "error" in answer:
        raise UserError(answer["error"])
    return answer


def points_main(args) -> int:
    source = group = None
    if args.group:
        source, group = _source_group(args.group)
    answer = _on_store(args.store, {"op": "points", "source": source, "group": group},
                       lambda store: {"points": recovery.list_points(store, source, group)})
    points = answer["points"]
    if args.group and not points:
        raise UserError(f"{args.group}: no such group in {args.store}")
    if args.json:
        print(json.dumps(points, indent=2))
        return 0
    print(f"{'SOURCE/GROUP':<32} {'POINT':>7}  {'CUT':<19}  {'SIZE':>9}  DISKS")
    for p in points:
        cut = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["cut_time"]))
        disks = ", ".join(d["path"] for d in p["disks"])
        print(f"{p['source'] + '/' + p['group']:<32} {p['id']:>7}  {cut:<19}  {format_size(p['bytes']):>9}  {disks}")
        if p.get("fenced"):
            print(f"    fenced: {p['fenced'].get('reason')}")
    return 0


def test_failover_main(args) -> int:
    if args.cleanup:
        if args.group or args.to:
            raise UserError("--cleanup DIR takes nothing else", EXIT_USAGE)
        for line in recovery.cleanup_test_failover(Path(args.cleanup).absolute()):
            print(line)
        return 0
    if not (args.store and args.group and args.to):
        raise UserError("test-failover needs --store URL, SOURCE/GROUP and --to DIR (or --cleanup DIR)", EXIT_USAGE)
    source, group = _source_group(args.group)
    to = Path(args.to).absolute()
    request = {"op": "test-failover", "source": source, "group": group, "to": str(to), "point": args.point,
               "format": args.format}
    answer = _on_store(args.store, request, lambda store: {"lines": recovery.test_failover(
        store, source, group, to, args.format, args.point)})
    for line in answer["lines"]:
        print(line)
    return 0


def failover_main(args) -> int:
    source, group = _source_group(args.group)
    to = Path(args.to).absolute()
    request = {"op": "failover", "source": source, "group": group, "to": str(to), "point": args.point}
    answer = _on_store(args.store, request, lambda store: {"lines": recovery.failover(
        store, source, group, to, args.point)})
    for line in answer["lines"]:
        print(line)
    return 0


def reprotect_main(args) -> int:
    datastore = Path(args.datastore).absolute()
    try:
        store = store_from_url(args.store)
    except StoreError as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    if not store.state_dir.is_dir():
        try:
            store.open()  # a new store for the reverse direction
        except StoreError as exc:
            raise UserError(str(exc)) from None
        store.close()
    answer = _on_store(args.store, {"op": "reprotect", "datastore": str(datastore)},
                       lambda s: {"lines": recovery.reprotect(s, datastore)})
    for line in answer["lines"]:
        print(line)
    return 0
