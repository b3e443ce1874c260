"""CPU allocator setting for training: reuse freed memory instead of mapping fresh pages.

glibc serves every allocation above 32 MiB (its largest mmap threshold) with a fresh ``mmap`` and
unmaps it on free. A training step allocates its ``[M, d]`` weight gradients anew each time
(38 MB each at M = 16,384, d = 576), so every step page-faults and zeroes ~9,000 fresh pages
per tensor, a large share of a Switch SAE step (measured: README, "Measured behind design
choices"). Serving
large blocks from the heap (``M_MMAP_MAX = 0``) and never trimming freed memory off its top
(``M_TRIM_THRESHOLD = -1``) lets the next step reuse the same pages. A 1 GiB trim threshold was
not enough for wide dictionaries, whose steps free more than that. Peak memory is unchanged: the blocks are the same
size every step.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
NEVER = -1  # as M_TRIM_THRESHOLD: never give freed heap memory back to the system


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from the heap and keep freed memory there.

    Process-wide and idempotent. Returns False (and changes nothing) where the C library is
    not glibc (macOS, musl, Windows).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER))
