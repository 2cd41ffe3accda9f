"""DR-site stores, chosen by URL: `dir:PATH` (sparse files) or `dev:MAPFILE` (block devices)."""

from __future__ import annotations

from pathlib import Path

from vrfs.errors import UserError
from vrfs.store.base import GroupState, Store, StoreError, StoreInUse

__all__ = ["GroupState", "Store", "StoreError", "StoreInUse", "open_store", "store_from_url", "store_status"]


def store_from_url(url: str) -> Store:
    """The store a URL names, not yet opened. Raises StoreError for a bad URL."""
    scheme, sep, rest = url.partition(":")
    if not sep or not rest:
        raise StoreError(f"bad store URL {url!r}: expected dir:PATH or dev:MAPFILE")
    path = Path(rest).expanduser().absolute()
    if scheme == "dir":
        from vrfs.store.dirstore import DirStore
        return DirStore(url, path)
    if scheme == "dev":
        from vrfs.store.devstore import DevStore
        return DevStore(url, path)
    raise StoreError(f"bad store URL {url!r}: unknown kind {scheme!r} (expected dir: or dev:)")


def open_store(url: str) -> Store:
    """Open a store for serving: creates its state and takes its lock."""
    store = store_from_url(url)
    store.open()
    return store


def store_status(url: str) -> list[dict]:
    """Every replicated disk of a store, read without locking it (for `vrfs status --store`).

    Each disk's ``state`` says whether its replica holds the group's point:
    ``ok``; ``failed-over`` (fenced: its images were handed over);
    ``incomplete`` while a committed cycle is not yet (or cannot be)
    applied, with the reason in ``error``; ``damaged`` when the replica is
    missing or has the wrong size. A bad URL or a directory that is not a
    store raises UserError (one line for the operator)."""
    try:
        store = store_from_url(url)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    if not store.state_dir.is_dir():
        raise UserError(f"{url} is not a vrfs store (no {store.state_dir})")
    if hasattr(store, "read_map"):
        try:
            store.read_map()
        except StoreError as exc:
            raise UserError(str(exc)) from None
    out = []
    for source, group, state in store.groups():
        point = {"id": state.cycle_id, "cut_time": state.cut_time}
        journal = store.staged_cycle(source, group)
        pending = journal.committed
        error = journal.apply_error() if pending else None
        for disk in state.disks:
            entry = {"source": source, "path": disk.path, "size": disk.size, "point": point}
            if state.fenced is not None:
                entry["state"] = "failed-over"
                entry["error"] = state.fenced.get("reason", "failed over")
            elif pending:
                entry["state"] = "incomplete"
                entry["error"] = error or "a committed cycle is being applied"
            else:
                damage = store.replica_damage(source, disk)
                entry["state"] = "damaged" if damage else "ok"
                if damage:
                    entry["error"] = f"replica {damage}"
            out.append(entry)
    for source, group, reason in store.damaged_groups():
        out.append({"source": source, "path": f"{group}/*", "size": 0, "point": None, "state": "damaged",
                    "error": reason})
    return out
