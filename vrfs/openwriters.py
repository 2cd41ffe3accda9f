"""Which processes hold regular files of a directory tree open for writing.

A process that opened a disk image before vrfs mounted over its directory
keeps writing to the backing file through its old descriptor; FUSE never sees
those writes, so they are never tracked and the replica silently diverges.
`vrfs mount` asks this module before it mounts. It reads /proc only: the
access mode of every descriptor (`flags:` in /proc/PID/fdinfo/FD, octal) and
the writable shared mappings in /proc/PID/maps (a file written through mmap
after its descriptor was closed).

Processes come and go while /proc is read; one that vanishes or cannot be read
is skipped, never an error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class OpenWriter:
    path: str  # relative to the tree's root
    pid: int
    command: str


def find_open_writers(root: str, *, exclude: Iterable[str] = (), ignore_pids: Iterable[int] = (),
                      proc: str = "/proc") -> list[OpenWriter]:
    """Every (file, process) pair where the process can write a regular file
    under ``root``, sorted by path. Files under the top-level names in
    ``exclude`` and the processes in ``ignore_pids`` are left out."""
    root = os.path.realpath(root)
    prefix = root.rstrip("/") + "/"
    excluded = tuple(prefix + name for name in exclude)
    ignored = set(ignore_pids)
    found: set[OpenWriter] = set()
    for pid in _pids(proc):
        if pid in ignored:
            continue
        paths = {p for p in _written_paths(f"{proc}/{pid}")
                 if p.startswith(prefix) and not any(p == e or p.startswith(e + "/") for e in excluded)}
        if paths:
            command = _command(f"{proc}/{pid}")
            found.update(OpenWriter(p[len(prefix):], pid, command) for p in paths)
    return sorted(found)


def describe(writers: list[OpenWriter], limit: int = 10) -> str:
    """``vm1/disk.raw (pid 1234 qemu-system-x86), ...``: one entry per file,
    the first ``limit`` files, then how many more."""
    by_path: dict[str, list[OpenWriter]] = {}
    for w in writers:
        by_path.setdefault(w.path, []).append(w)
    entries = [f"{path} ({', '.join(f'pid {w.pid} {w.command}' for w in holders)})"
               for path, holders in sorted(by_path.items())]
    text = ", ".join(entries[:limit])
    if len(entries) > limit:
        text += f" and {len(entries) - limit} more"
    return text


def _pids(proc: str) -> Iterator[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def _written_paths(pid_dir: str) -> set[str]:
    paths = set()
    try:
        fds = os.listdir(f"{pid_dir}/fd")
    except OSError:  # gone, a zombie, or not ours to read
        fds = []
    for fd in fds:
        path = _writable_fd_path(pid_dir, fd)
        if path is not None:
            paths.add(path)
    paths.update(_writable_shared_mappings(pid_dir))
    return paths


def _writable_fd_path(pid_dir: str, fd: str) -> str | None:
    try:
        target = os.readlink(f"{pid_dir}/fd/{fd}")
        if not target.startswith("/"):
            return None  # pipe:[…], socket:[…], anon_inode:…
        with open(f"{pid_dir}/fdinfo/{fd}") as f:
            flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), None)
        if flags is None or flags & os.O_PATH or flags & os.O_ACCMODE == os.O_RDONLY:
            return None
        st = os.stat(f"{pid_dir}/fd/{fd}")  # the open file itself, whatever its name now
    except (OSError, ValueError, IndexError):
        return None  # closed or the process ended meanwhile
    if not stat.S_ISREG(st.st_mode) or st.st_nlink == 0:
        return None  # an unlinked file is no longer part of the tree
    return target


def _writable_shared_mappings(pid_dir: str) -> set[str]:
    paths = set()
    try:
        with open(f"{pid_dir}/maps", "rb") as f:
            for line in f:
                # address perms offset dev inode path; perms "rw-s" is a shared writable mapping
                fields = line.rstrip(b"\n").split(maxsplit=5)
                if len(fields) == 6 and fields[1][1:2] == b"w" and fields[1][3:4] == b"s" \
                        and fields[5].startswith(b"/") and not fields[5].endswith(b" (deleted)"):
                    paths.add(os.fsdecode(fields[5]))
    except OSError:
        pass
    return paths


def _command(pid_dir: str) -> str:
    try:
        with open(f"{pid_dir}/comm") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"
