"""The CPU allocator setting the trainer applies: freed large blocks come back without page faults."""
from __future__ import annotations

import platform
import resource

import pytest
import torch

from switchsae.memory import reuse_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _fewest_faults(n_floats: int, repeats: int = 6) -> int:
    """Page faults of allocating and filling ``n_floats`` again after a first time, fewest over
    ``repeats``: a training step's allocations repeat, and the heap settles after a few rounds
    (an aligned block may not fit the hole its predecessor left until neighbours coalesce)."""
    torch.ones(n_floats)
    counts = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(n_floats)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts)


def test_a_freed_large_block_is_reused_without_faulting_its_pages_in_again():
    assert reuse_freed_memory()
    faults = _fewest_faults(10_000_000)  # 40 MB: above glibc's largest mmap threshold
    assert faults < 1000, f"{faults} page faults: the block was mapped afresh (~9,800 pages)"

