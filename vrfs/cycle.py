"""What a cycle is, shared by the shipper (source side) and the receiver (DR side).

A cycle is one shipment of one group: the group's whole namespace at the cut
(every disk with its identity, path and size) plus the changed blocks of its
disks. Files of the group that are absent from ``disks`` are deleted at the DR
site; a disk whose ``disk_id`` is known under another path was renamed. This
is how creations, deletions, renames and size changes travel inside cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
MAX_DISK_SIZE = 1 << 50  # 1 PiB: anything larger is a corrupt or hostile header
MAX_PATH_BYTES = 4096
MAX_DISKS_PER_GROUP = 4096
MAX_HISTORY = 64  # generations a disk entry carries (the newest ones)


class BadPath(ValueError):
    pass


def group_of(path: str) -> str:
    """The group of a datastore path: its first component (a VM's directory,
    or a top-level file which is a group of its own)."""
    return path.split("/", 1)[0]


def moved_path(path: str, old: str, new: str) -> str | None:
    """Where ``path`` is after ``old`` (a file or directory) moved to ``new``; None if unaffected."""
    if path == old:
        return new
    if path.startswith(old + "/"):
        return new + path[len(old):]
    return None


def exchanged_path(path: str, a: str, b: str) -> str | None:
    """Where ``path`` is after ``a`` and ``b`` swapped places (RENAME_EXCHANGE); None if unaffected."""
    moved = moved_path(path, a, b)
    return moved if moved is not None else moved_path(path, b, a)


def check_path(path: str, group: str | None = None) -> str:
    """Validate a datastore-relative path received from a peer or a user.

    Refuses what could leave the datastore or the group: absolute paths, '..',
    '.', empty components, NUL, the reserved '.vrfs' state directory, paths
    outside ``group``. Returns the path unchanged.
    """
    if not isinstance(path, str) or not path:
        raise BadPath("empty path")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise BadPath("path too long")
    if "\0" in path:
        raise BadPath("path contains NUL")
    if path.startswith("/"):
        raise BadPath(f"absolute path {path!r}")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise BadPath(f"path {path!r} has an empty, '.' or '..' component")
    if parts[0] == ".vrfs":
        raise BadPath(f"path {path!r} is in the reserved .vrfs directory")
    if group is not None and parts[0] != group:
        raise BadPath(f"path {path!r} is outside group {group!r}")
    return path


@dataclass(frozen=True)
class DiskEntry:
    """One disk of a group as of the cut."""

    disk_id: bytes  # 16 bytes, stable across renames, chosen by the source
    path: str  # relative to the datastore, first component == group
    size: int  # bytes, at the cut
    block_size: int
    # The disk's generations, oldest first: a failover starts a new one. A
    # receiver takes cycles only from a source whose history contains the
    # generation it holds (split brain: an old copy that lives on diverged).
    history: tuple[str, ...] = ()

    @property
    def block_count(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size


@dataclass(frozen=True)
class CycleHeader:
    group: str
    cycle_id: int  # increasing per (source, group); a point is a committed cycle
    cut_time: float  # unix time of the cut
    disks: tuple[DiskEntry, ...]
    # Disks whose full sync this cycle completes, by disk_id: the *basis* the
    # source compared against (the token the receiver gave with its hashes),
    # or None when the receiver had no copy. The receiver starts such a disk
    # from exactly that basis, or refuses the cycle if the basis is gone.
    full_sync: dict[bytes, str | None] = field(default_factory=dict)
