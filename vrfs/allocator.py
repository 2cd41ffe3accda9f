"""How the replication daemons ask glibc's malloc to treat their buffers.

A cycle moves its data through buffers of 2-4 MiB (reads, frames, TLS
records, received payloads), one after another. By default glibc gives each
such buffer fresh pages from the kernel (mmap above 128 KiB, adjusting) and
returns them when it is freed, so every buffer costs a page fault and a
zeroed page per 4 KiB: on the receiver's trio thread, as much time as the
copy itself. Kept in the heap, freed buffers are reused as they are.
Measured on a 512 MiB initial sync: about 7 % less time, and less CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value; larger buffers are mapped as before
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap kept for reuse
TOP_PAD = 64 << 20  # extra bytes asked of the kernel each time the heap grows


def keep_large_buffers() -> bool:
    """Best effort: whether this process's malloc (glibc) took the settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    return all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
