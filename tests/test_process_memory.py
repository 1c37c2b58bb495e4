"""A node's process returns freed tensors to the OS (wiring.process).

glibc raises its mmap threshold to the size of each mapped block freed, and from then on
serves blocks that large from the heap, which a node's tensors of ever new sizes only
grew (bench/soak.py). With the threshold set explicitly, a large block stays mapped on
its own after a larger one was freed, so freeing it gives its memory back.

Checked in a fresh interpreter: in this one, free heap space left by earlier tests
would serve the block before any mapping (as it should; reuse is not growth).
"""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's malloc only",
)

PROBE = """
import ctypes, ctypes.util, sys
from butterfly.wiring.process import MMAP_THRESHOLD_BYTES, return_large_blocks_to_the_os

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
if not hasattr(libc, "mallinfo2"):
    print("skip")
    sys.exit()
libc.mallinfo2.restype = MallInfo2
mapped = lambda: int(libc.mallinfo2().hblkhd)
if sys.argv[1] == "fixed":
    assert return_large_blocks_to_the_os()
big = bytearray(16 << 20)  # freed at once: glibc's own rule raises its threshold to 16 MiB
del big
before = mapped()
block = bytearray(4 * MMAP_THRESHOLD_BYTES)
grew = mapped() - before >= len(block)
del block
print("mapped" if grew and mapped() == before else "heap")
"""


def probe(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("a C library without mallinfo2")
    return out.stdout.strip()


def test_a_large_block_stays_mapped_after_a_larger_one_was_freed() -> None:
    assert probe("fixed") == "mapped"  # and unmapped when freed: back to the OS
    assert probe("glibc") == "heap"  # what it fixes: glibc's own rule
