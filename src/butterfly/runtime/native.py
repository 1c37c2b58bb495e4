"""The blocked fp32 product: Butterfly's one compiled kernel, built at load on the machine
that runs it.

Why it exists: a decode step is a handful of matrix-vector products whose cost is reading
the weights once, so the best kernel is the one that streams them at the memory's read
bandwidth. Neither of torch's fp32 kernels does on every CPU. On an AMD EPYC (AVX-512,
2 cores; docs/PERFORMANCE-LOG.md, "Issue 16 on an AMD EPYC") the small model's products streamed
from memory at 13.7 GB/s through `F.linear` (MKL's gemv) and 21 GB/s through oneDNN's
packed layout, against 31-33 GB/s for a plain sum over a buffer; on one thread, 14.5 GB/s
packed against 27 GB/s for the sum. This kernel reached 31.6 GB/s on two threads and
27.6 on one in the same run: the weight is held as blocks of 16 output rows interleaved
position by position (`block`), so a product reads it as a single sequential stream, one
cache line per input position, and keeps 16 outputs in one vector register.

It is one more candidate of runtime/linear.py, timed against the others at load, never
chosen by name: on a CPU where MKL or oneDNN is faster, they win. A bf16 or int8 weight
is held blocked in its own type and widened to fp32 as it is loaded: a half or a quarter
of the bytes, the same sums (int8 times each output row's scale).

Built at load for the CPU that runs it (runtime/native_build.py), once per way of
fetching the weight ahead of the stream, and the process keeps the build that streams
fastest here (`stream_choice`): on the Intel Xeon one of them streamed at half the rate
of the other, on the AMD EPYC it had won. Where no compiler is found, the candidate is
absent and the others run. Before first use it is checked against `F.linear`; a library
that disagrees is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import math
import mmap
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from butterfly.runtime import native_build
from butterfly.runtime.torch_thread import threads

log = logging.getLogger(__name__)

SYMBOLS = {
    torch.float32: "butterfly_blocked_linear_f32",
    torch.bfloat16: "butterfly_blocked_linear_bf16",  # bf16 weights, fp32 rows and sums
    torch.int8: "butterfly_blocked_linear_i8",  # int8 weights, sums before the scales
}
LAYERS_SYMBOL = "butterfly_llama_layers_f32"
BLOCK = 16  # output rows per block: one 64-byte vector of fp32
HUGE_PAGE = 2 << 20
STREAM_ROUNDS = 5

# x, M, K, w, NB, y; the int8 product returns -1 where it had no scratch memory
Kernel = Callable[[int, int, int, int, int, int], int | None]


@dataclass(frozen=True)
class BlockedWeight:
    """A weight [out, in] as `blocks` [ceil(out / 16), in, 16], zero rows padding the
    last block: fp32 or bf16, or int8 with a scale per output row (`scales` [out], in the
    compute dtype, as runtime/linear.py's Int8Weight). With `group` 4 (int8 for the VNNI
    product, blocked_linear.c) each block's memory is [in / 4][16][4] under the same
    shape: four input positions of an output row side by side."""

    blocks: torch.Tensor
    out_features: int
    scales: torch.Tensor | None = None
    group: int = 1

    def dense(self) -> torch.Tensor:
        """The fp32 matrix [out, in] this weight computes with."""
        nblocks, width = int(self.blocks.shape[0]), int(self.blocks.shape[1])
        blocks = self.blocks
        if self.group > 1:
            grouped = blocks.view(nblocks, width // self.group, BLOCK, self.group)
            blocks = grouped.permute(0, 1, 3, 2).reshape(nblocks, width, BLOCK)
        rows = blocks.transpose(1, 2).reshape(nblocks * BLOCK, width).float()
        rows = rows[: self.out_features]
        return rows if self.scales is None else rows * self.scales.float()[:, None]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, int(self.blocks.shape[1])))

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype


def block(weight: torch.Tensor) -> BlockedWeight:
    """`weight` [out, in] in the blocked layout, bf16 if it is bf16 and fp32 otherwise,
    on huge pages where the kernel grants them (`empty_on_huge_pages`)."""
    dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
    return BlockedWeight(_blocks(weight.to(dtype)), int(weight.shape[0]))


def block_int8(q: torch.Tensor, scales: torch.Tensor) -> BlockedWeight:
    """Int8 weights `q` [out, in] with their rows' `scales`, in the blocked layout: a
    quarter of fp32's bytes to stream, scaled per output. Grouped in fours where this
    CPU's library multiplies bytes directly (`i8_group`), else widened in registers."""
    group = i8_group(int(q.shape[1]))
    return BlockedWeight(_blocks(q, group), int(q.shape[0]), scales.contiguous(), group)


def i8_group(width: int) -> int:
    """How many input positions the int8 product reads side by side for inputs of
    `width`: 4 on the VNNI product, 1 on the widened one (or with no library)."""
    lib = _library()
    return int(lib.butterfly_i8_group(ctypes.c_int64(width))) if lib is not None else 1


def _blocks(dense: torch.Tensor, group: int = 1) -> torch.Tensor:
    """[out, in] as [ceil(out / 16), in, 16] in its own dtype, zero rows padding the last
    block, on huge pages; with `group`, each block's memory [in / group][16][group]."""
    out, width = int(dense.shape[0]), int(dense.shape[1])
    padded = -(-out // BLOCK) * BLOCK
    if padded != out:
        dense = F.pad(dense, (0, 0, 0, padded - out))
    blocks = empty_on_huge_pages((padded // BLOCK, width, BLOCK), dense.dtype)
    rows = dense.reshape(padded // BLOCK, BLOCK, width // group, group)
    order = rows.permute(0, 2, 1, 3).reshape(padded // BLOCK, width, BLOCK)
    return blocks.copy_(order)


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor in anonymous memory advised for transparent huge pages, starting on
    a 2 MiB boundary, for a weight that decode streams in full every step.

    Why: the small model's 48 blocked matrices, read in turn, streamed at 26.9 GB/s on
    4 KiB pages and 32.8 GB/s on 2 MiB pages (AMD EPYC, 2 threads, the same C loop; a
    plain sum over them 27.5 against 33.9): a stream that starts in a fresh matrix every
    few megabytes pays a page walk every 4 KiB otherwise. torch allocates without the
    advice, and with the kernel's usual `madvise` mode for transparent huge pages, no
    huge page is given without it. Small tensors, or a kernel that grants none, simply
    get ordinary pages. Only the data's whole 2 MiB pages are advised, so a partial last
    one stays on ordinary pages and resident memory stays the weight's bytes."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr()
    offset = -start % HUGE_PAGE
    with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE on this system
        area.madvise(mmap.MADV_HUGEPAGE, offset, nbytes - nbytes % HUGE_PAGE)
    return torch.frombuffer(area, dtype=dtype, count=count, offset=offset).view(shape)


def last_level_cache_bytes() -> int | None:
    """The size of CPU 0's last-level cache, from sysfs (None where it does not say)."""
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        scale = units.get(size[-1:].upper(), 1)
        digits = size[:-1] if size[-1:].upper() in units else size
        if digits.isdigit() and (best is None or level > best[0]):
            best = (level, int(digits) * scale)
    return None if best is None else best[1]


L3_COUNTED_MAX = 64 << 20
"""The most of the last-level cache that `cold_bytes` counts (runtime/linear.py `COLD_BYTES`, and
the stream timing here). A VM's sysfs gives its
host socket's whole L3, of which its few vCPUs see a share: the Intel Xeon VM of
2026-12-07 (2 vCPUs) reported 480 MiB, so a candidate was timed over 960 MiB of copies
and loading one 9 MiB weight held 2.9 GB more for its three candidates at once (a
review); a node sized to its stage could be killed at load. Its decode read the 434 MB
small model at 23 GB/s, a memory's rate, not an L3's."""


def cold_bytes(l3: int | None) -> int:
    """Bytes a kernel is timed over so that it reads them from memory, as decode does
    (runtime/linear.py's candidates, `_stream_rates`), for an L3 of `l3` bytes: twice it (64
    MiB where sysfs does not say: twice the 32 MiB L3 of the AMD EPYC this was first
    measured on), so the weight comes from memory; a fixed 64 MiB left a Xeon's 105 MB L3
    timing from cache. Counted up to `L3_COUNTED_MAX`."""
    return 2 * min(l3 or 32 << 20, L3_COUNTED_MAX)


def stream_choice() -> native_build.StreamChoice | None:
    """Which build this process's kernels are (None where none could be built)."""
    chosen = _chosen()
    return chosen[0] if chosen is not None else None


def blocked_linear(
    x: torch.Tensor, weight: BlockedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, W, bias)` for x [..., in] of the weight's dtype (of its scales' for
    int8). A bf16 product is summed in fp32 and rounded once, bias included, as torch's
    bf16 `F.linear` does."""
    kernel = _kernels().get(weight.dtype)
    if kernel is None:
        raise RuntimeError(f"the blocked {weight.dtype} kernel is not available in this process")
    width = int(weight.blocks.shape[1])
    compute = weight.scales.dtype if weight.scales is not None else weight.dtype
    if x.dtype != compute or x.shape[-1] != width:
        raise ValueError(
            f"blocked product of {tuple(x.shape)} {x.dtype} by [*, {width}] {weight.dtype}"
        )
    rows = x.reshape(-1, width).to(torch.float32).contiguous()
    count = int(rows.shape[0])
    nblocks = int(weight.blocks.shape[0])
    y = torch.empty(count, nblocks * BLOCK, dtype=torch.float32)
    ptrs = (rows.data_ptr(), count, width, weight.blocks.data_ptr(), nblocks, y.data_ptr())
    if count and kernel(*ptrs):
        raise MemoryError(f"no scratch memory for a blocked product of {count} rows")
    if nblocks * BLOCK != weight.out_features:
        y = y[:, : weight.out_features]
    if weight.scales is not None:
        y = y * weight.scales.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel for `dtype` weights (fp32, bf16 or int8) was built (or found built),
    loaded and checked in this process."""
    return dtype in _kernels()


def library() -> ctypes.CDLL | None:
    """The built library once its fp32 product has been checked against `F.linear`: what
    runtime/fused_layers.py takes its layers function from. None where there is none."""
    return _library() if available() else None


def _library() -> ctypes.CDLL | None:
    chosen = _chosen()
    return chosen[1] if chosen is not None else None


@functools.cache
def _chosen() -> tuple[native_build.StreamChoice, ctypes.CDLL] | None:
    """Every build of `native_build.STREAMS` loaded, timed against the others, and the one
    `native_build.choose_stream` picks kept; once per process, the timing once per set
    of builds (`native_build.remembered`)."""
    built: dict[str, ctypes.CDLL] = {}
    paths: list[str] = []
    for name, flags in native_build.STREAMS.items():
        try:
            path = native_build.build(flags)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.info("blocked kernel (%s) not available: %s", name, e)
            continue
        if _agrees(_declared(lib, torch.float32), torch.float32):  # else the other build
            built[name] = lib
            paths.append(path.name)
        else:
            log.warning("the %s build's fp32 product disagrees with F.linear; not used", name)
    if not built:
        return None
    if len(built) == 1:
        return native_build.StreamChoice(next(iter(built)), {}, False), next(iter(built.values()))
    key = hashlib.sha256(" ".join(paths).encode()).hexdigest()[:20]
    record = native_build.cache_dir() / f"stream-{key}.json"
    with open(record.with_suffix(".lock"), "a") as lock:  # node processes start together:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one times, alone, and the others read its record
        gbs = native_build.remembered(record, set(built))
        remembered = gbs is not None
        if gbs is None:
            gbs = _stream_rates(built)
            if native_build.decisive(gbs):
                native_build.remember(record, gbs)
    name = native_build.choose_stream(gbs)
    log.info("blocked kernels: the %s build (fp32 stream, GB/s: %s; %s)", name, gbs, record)
    return native_build.StreamChoice(name, gbs, remembered), built[name]


def _stream_rates(built: Mapping[str, ctypes.CDLL]) -> dict[str, float]:
    """Each build's fp32 product over `cold_bytes` of blocked weight, on as many torch
    threads as this process has CPUs (a node loads on one thread, and decodes on its
    CPUs unless `resources.threads` says fewer): its best of `STREAM_ROUNDS`, the builds
    taking turns."""
    width = 768
    nblocks = cold_bytes(last_level_cache_bytes()) // (width * BLOCK * 4)
    blocks = empty_on_huge_pages((nblocks, width, BLOCK)).fill_(0.5)  # touched, no denormals
    x, y = torch.full((1, width), 0.25), torch.empty(1, nblocks * BLOCK)
    products = {name: _declared(lib, torch.float32) for name, lib in built.items()}
    ptrs = (x.data_ptr(), 1, width, blocks.data_ptr(), nblocks, y.data_ptr())
    best = dict.fromkeys(built, math.inf)
    with threads(len(os.sched_getaffinity(0))):
        for _ in range(STREAM_ROUNDS + 1):  # the first round warms
            for name, product in products.items():
                start = time.perf_counter()
                product(*ptrs)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(blocks.nbytes / t / 1e9, 2) for name, t in best.items()}


def _declared(lib: ctypes.CDLL, dtype: torch.dtype) -> Kernel:
    fn = getattr(lib, SYMBOLS[dtype])
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.argtypes += [ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_int if dtype == torch.int8 else None  # -1: no scratch memory
    return fn  # type: ignore[no-any-return]


@functools.cache
def _kernels() -> dict[torch.dtype, Kernel]:
    """Build, load and check the library once per process: each weight dtype's product
    that agrees with `F.linear`. Empty (logged) if any step fails, so the other
    candidates run."""
    lib = _library()
    found: dict[torch.dtype, Kernel] = {}
    for dtype, symbol in SYMBOLS.items():
        if lib is None or getattr(lib, symbol, None) is None:
            continue
        fn = _declared(lib, dtype)
        if dtype == torch.float32 or _agrees(fn, dtype):  # fp32: checked by `_chosen`
            found[dtype] = fn
        else:
            log.warning("the blocked %s kernel disagrees with F.linear; not used", dtype)
    return found


def _agrees(kernel: Kernel, dtype: torch.dtype) -> bool:
    """Every row count of a tile, at an odd width and (the int8 product's grouped layout)
    a multiple of 4."""
    g = torch.Generator().manual_seed(0)
    for width in (53, 64):
        if dtype == torch.int8:
            w = torch.randint(-127, 128, (37, width), generator=g, dtype=torch.int8)
            blocked = block_int8(w, torch.ones(37))
        else:
            w = torch.randn(37, width, generator=g).to(dtype)
            blocked = block(w)
        nblocks = int(blocked.blocks.shape[0])
        for rows in (1, 3, 8, 13):
            x = torch.randn(rows, width, generator=g)
            y = torch.empty(rows, nblocks * BLOCK)
            if kernel(x.data_ptr(), rows, width, blocked.blocks.data_ptr(), nblocks, y.data_ptr()):
                return False
            if not torch.allclose(y[:, :37], F.linear(x, w.float()), rtol=1e-4, atol=1e-4):
                return False
    return True
