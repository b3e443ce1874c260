"""The CPU allocator setting the trainer applies: freed large blocks come back without page faults."""
from __future__ import annotations

import platform
import resource

import pytest
import torch

from switchsae.memory import reuse_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_large_block_is_reused_without_faulting_its_pages_in_again():
    assert reuse_freed_memory()
    n = 10_000_000  # 40 MB: above glibc's largest mmap threshold, so normally a fresh mapping each time
    torch.zeros(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(n)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000, f"{faults} page faults: the block was mapped afresh (~9,800 pages)"
