"""A node's process returns freed tensors to the OS (wiring.process).

glibc raises its mmap threshold to the size of each mapped block freed, and from then on
serves blocks that large from the heap, which a node's tensors of ever new sizes only
grew (bench/soak.py). With the threshold set explicitly, a large block stays mapped on
its own after a larger one was freed, so freeing it gives its memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from butterfly.wiring.process import MMAP_THRESHOLD_BYTES, return_large_blocks_to_the_os

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's malloc only",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def mapped_bytes() -> int:
    """Bytes in blocks malloc mapped on their own (mallinfo2's hblkhd)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("a C library without mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


def test_a_large_block_stays_mapped_after_a_larger_one_was_freed() -> None:
    assert return_large_blocks_to_the_os()
    big = bytearray(16 << 20)  # freed below: glibc's own rule would raise its threshold
    del big
    before = mapped_bytes()
    block = bytearray(4 * MMAP_THRESHOLD_BYTES)
    assert mapped_bytes() - before >= len(block)  # mapped on its own, not from the heap
    del block
    assert mapped_bytes() == before  # and unmapped when freed: back to the OS
