"""The kernel's view of inodes: which paths name an inode and how many
lookups the kernel holds on it (pyfuse3's rules: lookup, create, mkdir,
mknod, symlink, link and each readdirplus entry add one; forget subtracts)."""

from __future__ import annotations

from collections.abc import Callable

import pyfuse3

from vrfs.cycle import exchanged_path, moved_path


class InodeTable:
    def __init__(self, backing_root_ino: int) -> None:
        self._root = backing_root_ino
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {"."}}
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}

    def fuse_ino(self, backing_ino: int) -> int:
        """Backing inode numbers serve as FUSE inodes; the backing root and
        inode 1 (the FUSE root's number) swap places."""
        if backing_ino == self._root:
            return pyfuse3.ROOT_INODE
        if backing_ino == pyfuse3.ROOT_INODE:
            return self._root
        return backing_ino

    def backing_ino(self, fuse_ino: int) -> int:
        return self.fuse_ino(fuse_ino)  # the mapping is its own inverse

    def path(self, ino: int) -> str:
        """One path of a known inode, relative to the backing root."""
        paths = self._paths.get(ino)
        if not paths:
            raise KeyError(ino)
        return next(iter(paths))

    def other_path(self, ino: int, path: str) -> str | None:
        """Another known name of ``ino`` than ``path``, if the kernel knows one."""
        return next((p for p in self._paths.get(ino, ()) if p != path), None)

    def child(self, parent: int, name: str) -> str:
        base = self.path(parent)
        return name if base == "." else f"{base}/{name}"

    def remember(self, ino: int, path: str) -> None:
        """The kernel learned of ``ino`` under ``path``: one more lookup."""
        self._paths.setdefault(ino, set()).add(path)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        if ino == pyfuse3.ROOT_INODE:
            return
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
        else:
            self._lookups.pop(ino, None)
            self._paths.pop(ino, None)

    def unlinked(self, ino: int, path: str) -> None:
        paths = self._paths.get(ino)
        if paths:
            paths.discard(path)

    def renamed(self, old: str, new: str) -> None:
        self._move(lambda p: moved_path(p, old, new))

    def exchanged(self, a: str, b: str) -> None:
        self._move(lambda p: exchanged_path(p, a, b))

    def _move(self, where: Callable[[str], str | None]) -> None:
        for ino, paths in self._paths.items():
            moved = {where(p) or p for p in paths}
            if moved != paths:
                self._paths[ino] = moved
