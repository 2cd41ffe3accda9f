"""Writing files so that a crash leaves either the old or the new content
(after borg's SaveFile): temp file in the same directory, fsync, rename over
it, fsync the directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomically(dir_fd: int, name: str, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``data``, crash-safely."""
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync_dir:
        os.fsync(dir_fd)


def atomic_write(path: Path, data: bytes) -> None:
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomically(dir_fd, path.name, data)
    finally:
        os.close(dir_fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a directory tree and make the removal durable."""
    if path.exists():
        shutil.rmtree(path)
        fsync_dir(path.parent)
