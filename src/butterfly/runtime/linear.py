"""Matrix products of a stage, each weight on the kernel measured fastest for its shape.

Which kernel wins depends on the CPU, not on its vendor's name: on an AMD EPYC whose MKL
ran AVX2 code, oneDNN's packed fp32 layout ran decode products 1.5-2.2x faster than
`F.linear`; on an Intel Xeon (AVX-512, AMX) MKL was already at the memory bandwidth and
the packed path was 0.7-0.9x as fast, while packed bf16 ran 1.5-2x faster than plain
bf16 (docs/PERFORMANCE-LOG.md, "Kernel selection"). So at load, for each distinct weight
shape and precision, every candidate the precision allows is timed on the decode shape
(one row) and the fastest kept, once per process (`kernel_choices()` lists them). A
candidate this CPU cannot build or run (oneDNN's packed fp16 without avx512_fp16, packed
bf16 without avx512_bf16) is left out of the timing (`runnable`), found by trying it.

Every candidate computes the same product up to the rounding of the compute dtype, so
two nodes that chose differently still agree within the verification tolerance:
- "plain": `F.linear` on the dense weight;
- "packed": oneDNN's blocked layout, packed once (fp32, bf16, fp16);
- "blocked": Butterfly's own compiled kernel (fp32; bf16 and int8 widened in registers) on
  rows interleaved in blocks of 16 (runtime/native.py), where a C compiler is found; it
  streams the weights at the read bandwidth on CPUs where neither of torch's does;
- "int8mm": `torch._weight_int8pack_mm`, int8 weights with per-channel scales,
  activations in the compute dtype (weight-only quantization);
- "int8_dequant": the int8 weight widened to the compute dtype at each call.
Dynamic activation quantization (`quantized.linear_dynamic`) is not a candidate: it
rounds the activations to 8 bits, a different function from the one the other nodes
compute, and the audit would see that as a lie.

oneDNN builds a primitive per shape of a packed product, and its primitive cache and
ideep's (1024 entries each) keep it together with a buffer the size of the product's
output: measured 0.75 MB per new row count at 20 rows of a [768 -> 6144] product, 6.1 MB
at 250, about 40 KB per row for the small model's four packed weights together. Every new
prompt length added one, and a node under mixed prompt lengths grew 23-33 MB/min
(bench/soak.py). So a packed product runs its rows in few shapes (`row_chunks`): a decode
batch of up to `UNPADDED_ROWS` rows as it is, of up to `EXACT_ROWS` padded to a power of
two, longer ones padded to a multiple of `ROW_ALIGN` and cut into chunks of at most
`MAX_CHUNK_ROWS`: 13 shapes per weight whatever the length (`ROW_SHAPES`). Rows are
computed independently (a row's result does not depend on its batch,
tests/test_linear.py), so padding rows only cost their compute and are dropped.

Each primitive is also JIT-compiled code, an anonymous rwx mapping of 0.2-2 MB, per shape
and per thread count (a decode step may run on the event loop's one thread, an audit
runs on one thread, the rest on the node's torch threads). Made on first use, they kept
arriving for as long as the soak ran, as rare shapes turned up: the chain nodes' code
mappings went 47 -> 69 in 11 minutes after the warm-up (1.2-1.3 MB/min; node logs with
`ONEDNN_VERBOSE=profile_create`: one mapping per primitive cache miss, each miss the
first product of one row count at one thread count). So `prepare` runs every shape of
a packed weight once at load, on one thread and on the decode threads (`warm`): the
code is made before the node serves, and none after.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from butterfly.runtime import native
from butterfly.runtime.native import BlockedWeight, cold_bytes, last_level_cache_bytes
from butterfly.runtime.precision import Precision, int8_weight_kernel_available, quantize_int8
from butterfly.types.errors import UnsupportedPrecision

log = logging.getLogger(__name__)

# products with at most this many rows (decode batches) run padded to a power of two
EXACT_ROWS = 16
# ... but those of at most this many keep their own shape: padding 3 rows to 4 cost a
# packed decode step of the small model 10% (26.3 -> 29.0 ms), and batches of up to 4
# are the common ones
UNPADDED_ROWS = 4
# longer packed products are padded to a multiple of this and run in chunks of at most
# MAX_CHUNK_ROWS; 128 rows of the small model's largest product is 0.6 GFLOP, enough
# for the kernel's blocking, so chunking costs only the ~12 us of one more call each
ROW_ALIGN = 16
MAX_CHUNK_ROWS = 128
ROUNDS = 7  # timed rounds per candidate, interleaved so drift hits all alike
# `blocked` is kept for a llama layer's matrices and an fp32 last stage's head
# (`prepare(fusable=True)`, runtime/llama_load.py) when within this
# factor of the fastest product: blocked weights also let the stage run its layers in one
# compiled call (runtime/fused_layers.py), which
# a product's timing cannot see. That call made the small model's decode 14% faster
# than the same blocked products under torch's operations (AMD EPYC, bench/runtime.py:
# 16.8 against 19.7 ms/token), more than a product 10% slower costs.
FUSED_MARGIN = 1.10
# ...or when at most the microseconds the compiled call saves per matrix slower: it saves
# about that much on top of the products, whatever their size. The loader measures it on
# the machine (runtime/llama_load.py `fused_saving_us`); this is the default where it is
# not measured. For the tiny demo model (4 layers, [64..352, 64] matrices) `plain` was
# 4-8 us a product and `blocked` 11-14 (threads woken for each), so the 10% margin left
# every matrix on `plain` and the stage on torch's operations: 597 us a decode step,
# against 133 us blocked in one call, 35 us saved per matrix (AMD EPYC, 2 threads; the
# small model's 2.9 ms over 48 matrices: 60). On the Intel Xeon the small model's down
# projection timed 1.11-1.17x slower blocked, so one matrix on `plain` kept every layer
# of the stage on torch's operations: 31-32 ms a token against 24-25 (thirtieth session).
FUSED_SLACK_US = 30.0
CALLS = 4  # products per round


COLD_BYTES = cold_bytes(last_level_cache_bytes())
MAX_COPIES = 128  # a [768, 768] int8 weight needs 107 on a 32 MiB L3


@dataclass(frozen=True)
class Int8Weight:
    """Weight-only int8: `q` [out, in] int8, `scales` [out] in the compute dtype."""

    q: torch.Tensor
    scales: torch.Tensor
    kernel: str  # "int8mm" or "int8_dequant"

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dense(self) -> torch.Tensor:
        """The fp32 matrix this weight computes with: the accuracy check's reference."""
        return self.q.float() * self.scales.float()[:, None]


Weight = torch.Tensor | Int8Weight | BlockedWeight


@dataclass(frozen=True)
class KernelChoice:
    shape: tuple[int, int]  # [out, in]
    precision: str
    threads: int  # torch threads it was timed on
    kernel: str
    micros: dict[str, float]  # time of one decode product (fastest round), per candidate


_CHOSEN: dict[tuple[tuple[int, int], Precision, int, float | None], KernelChoice] = {}
_WARMED: set[tuple[tuple[int, int], Precision, int]] = set()
_DECODE_THREADS: ContextVar[int | None] = ContextVar("decode_threads", default=None)


@contextlib.contextmanager
def timed_on_threads(threads: int) -> Iterator[None]:
    """Time candidates on `threads` torch threads inside the block: a stage loaded on one
    thread (runtime.torch_thread.single_threaded) decodes on all of the process's, and
    the kernel that wins on one thread need not win on two."""
    token = _DECODE_THREADS.set(threads)
    try:
        yield
    finally:
        _DECODE_THREADS.reset(token)


def decode_threads() -> int:
    """The torch threads decode runs on: those of `timed_on_threads`, or this thread's."""
    return _DECODE_THREADS.get() or torch.get_num_threads()


def kernel_choices() -> list[KernelChoice]:
    """The choices this process made, for logs, benchmarks and `bench/runtime.py`."""
    return list(_CHOSEN.values())


def packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(  # type: ignore[no-untyped-call]
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


def candidates(precision: Precision) -> tuple[str, ...]:
    if precision.quantization == "int8":
        int8: tuple[str, ...] = ("int8mm",) if int8_weight_kernel_available() else ()
        int8 += ("int8_dequant",)
        return (*int8, "blocked") if native.available(torch.int8) else int8
    kernels: tuple[str, ...] = ("plain", "packed") if packing_available() else ("plain",)
    if native.available(precision.dtype):  # fp32 and bf16
        kernels += ("blocked",)
    return kernels


def build(
    kernel: str,
    weight: torch.Tensor,
    precision: Precision,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Weight:
    """`weight` [out, in] (any float dtype) on `kernel`, in `precision`. `quantized`:
    `quantize_int8(weight)`, when the caller has it (`prepare` builds every int8
    candidate from one quantization)."""
    int8 = kernel in ("int8mm", "int8_dequant") or (
        kernel == "blocked" and precision.quantization == "int8"
    )
    if int8:
        q, scales = quantized if quantized is not None else quantize_int8(weight)
        scales = scales.to(precision.dtype)
        return (
            native.block_int8(q, scales) if kernel == "blocked" else Int8Weight(q, scales, kernel)
        )
    dense = weight.to(precision.dtype).contiguous()
    if kernel == "plain":
        return dense
    if kernel == "packed":
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(dense)
        return packed
    if kernel == "blocked":
        return native.block(dense)
    raise ValueError(f"unknown kernel {kernel!r}")


def prepare(
    weight: torch.Tensor,
    precision: Precision,
    timer: Callable[[dict[str, Weight], Precision], dict[str, float]] | None = None,
    *,
    fusable: bool = False,
    fused_slack_us: float = FUSED_SLACK_US,
) -> Weight:
    """`weight` on the kernel measured fastest for its shape in this process; `timer`
    (default `time_decode`) gives each built candidate's time. A `fusable` weight (one
    of a llama-style layer's four matrices, or the head the compiled call runs with the
    final norm) keeps `blocked` within `FUSED_MARGIN` or
    `fused_slack_us` (what the compiled layers save per matrix) of the fastest."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    threads = decode_threads()
    key = (shape, precision, threads, fused_slack_us if fusable else None)
    choice = _CHOSEN.get(key)
    if choice is not None:
        return build(choice.kernel, weight, precision)
    quantized = quantize_int8(weight) if precision.quantization == "int8" else None
    built = runnable(weight, precision, quantized)
    micros = {k: 0.0 for k in built}
    if len(built) > 1:
        loading_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            micros = (timer or time_decode)(built, precision)
        finally:
            torch.set_num_threads(loading_threads)
    kernel = min(micros, key=lambda k: micros[k])
    if fusable and "blocked" in micros:
        fastest = micros[kernel]
        if micros["blocked"] <= max(FUSED_MARGIN * fastest, fastest + fused_slack_us):
            kernel = "blocked"
    choice = KernelChoice(shape, precision.name, threads, kernel, micros)
    _CHOSEN[key] = choice
    log.info(
        "kernel for %s %s: %s (us per decode product: %s)", shape, precision.name, kernel, micros
    )
    chosen = built[kernel]
    if isinstance(chosen, torch.Tensor) and chosen.is_mkldnn:
        warm(chosen, precision, sorted({1, threads}))
    return chosen


def runnable(
    weight: torch.Tensor,
    precision: Precision,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Weight]:
    """Every candidate of `precision` built, less those this CPU cannot build or run.

    Whether oneDNN has a kernel is a property of the CPU that only trying tells: on an
    AMD EPYC with AVX-512 but neither avx512_fp16 nor avx_ne_convert, packing an fp16
    weight raises, while `F.linear` in fp16 runs; packed bf16 likewise needs
    avx512_bf16 (or AMX). So each candidate is built and run once on a decode row, and
    one that raises is left out of the timing, not allowed to fail the load."""
    x = torch.zeros(1, 1, int(weight.shape[1]), dtype=precision.dtype)
    built: dict[str, Weight] = {}
    for kernel in candidates(precision):
        try:
            candidate = build(kernel, weight, precision, quantized)
            with torch.inference_mode():
                linear(x, candidate)
        except RuntimeError as e:  # torch's errors for a missing kernel
            log.debug("kernel %s cannot run %s on this CPU: %s", kernel, precision.name, e)
            continue
        built[kernel] = candidate
    if not built:
        raise UnsupportedPrecision(
            f"no matrix-product kernel runs {precision.name} on this CPU; "
            "set model.dtype to float32"
        )
    return built


def warm(weight: torch.Tensor, precision: Precision, threads: list[int]) -> None:
    """Run a packed product once in every shape of `ROW_SHAPES` on each of `threads`, so
    oneDNN compiles its kernels now rather than while the node serves (see the module's
    docstring); once per weight shape, precision and thread count in a process. Without
    a bias: a layer with one gets kernels of its own on first use."""
    loading_threads = torch.get_num_threads()
    try:
        for count in threads:
            key = ((int(weight.shape[0]), int(weight.shape[1])), precision, count)
            if key in _WARMED:
                continue
            torch.set_num_threads(count)
            with torch.inference_mode():
                for rows in ROW_SHAPES:
                    _packed(
                        torch.zeros(rows, int(weight.shape[1]), dtype=precision.dtype), weight, None
                    )
            _WARMED.add(key)
    finally:
        torch.set_num_threads(loading_threads)


def time_decode(built: dict[str, Weight], precision: Precision) -> dict[str, float]:
    """Microseconds of one decode-shaped product ([1, 1, in]) per candidate, on a weight
    read from memory, as decode reads it: each call takes the next of enough copies of
    the candidate's weight to overflow the last-level cache (`cold_copies`). Timed on
    one hot copy, a 9.4 MB bf16 matrix fit in an AMD EPYC's 32 MiB L3, and oneDNN's
    packed layout won by 20-40%; streamed from memory in a decode step, it ran at about
    4x its bandwidth floor (docs/PERFORMANCE-LOG.md)."""
    some = next(iter(built.values()))
    x = torch.randn(1, 1, int(some.shape[1]), generator=torch.Generator().manual_seed(0))
    x = x.to(precision.dtype)
    copies = {k: cold_copies(w) for k, w in built.items()}
    samples: dict[str, list[float]] = {k: [] for k in built}
    with torch.inference_mode():
        for w in built.values():  # warm-up: first calls allocate and JIT-select
            linear(x, w)
        keys = list(copies)
        for r in range(ROUNDS):
            # the order rotates: the candidate built last has its copies freshest in the
            # cache, and one timed always first meets what the others left behind
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                ws = copies[k]
                t0 = time.perf_counter()
                for c in range(CALLS):
                    linear(x, ws[(r * CALLS + c) % len(ws)])
                samples[k].append((time.perf_counter() - t0) / CALLS * 1e6)
    # the fastest round, not the median: on a shared machine the other rounds measure
    # the waits for a CPU (a bench run at load average 17 timed 20 ms per product of
    # 20-200 us), which say nothing about the kernel
    return {k: round(min(v), 2) for k, v in samples.items()}


def cold_copies(weight: Weight) -> list[Weight]:
    """`weight` and copies of it, together at least `COLD_BYTES` (at most `MAX_COPIES`):
    cycled through, each product reads its weight from memory. They are dropped once
    the shape is timed; while it is, a candidate holds up to `COLD_BYTES` more."""
    size = weight_bytes(weight)
    count = min(MAX_COPIES, -(-COLD_BYTES // max(size, 1)))
    return [weight, *(_copy(weight) for _ in range(count - 1))]


def _copy(weight: Weight) -> Weight:
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.q.clone(), weight.scales.clone(), weight.kernel)
    if isinstance(weight, BlockedWeight):  # on huge pages, as the weight it times
        blocks = native.empty_on_huge_pages(tuple(weight.blocks.shape), weight.blocks.dtype)
        return replace(weight, blocks=blocks.copy_(weight.blocks))
    return weight.clone()


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, for a weight on any kernel."""
    if isinstance(weight, Int8Weight):
        if weight.kernel == "int8mm":
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            y = torch._weight_int8pack_mm(rows, weight.q, weight.scales)
            y = y.view(*x.shape[:-1], y.shape[-1])
        else:
            y = F.linear(x, weight.q.to(x.dtype) * weight.scales[:, None])
        return y if bias is None else y + bias
    if isinstance(weight, BlockedWeight):
        return native.blocked_linear(x, weight, bias)
    if weight.is_mkldnn:
        return _packed_in_few_shapes(x, weight, bias)
    return F.linear(x, weight, bias)


def row_chunks(rows: int) -> list[int]:
    """The row counts a packed product of `rows` rows runs as: up to `UNPADDED_ROWS`,
    `[rows]`; up to `EXACT_ROWS`, `rows` rounded up to a power of two (5 -> [8]); else
    rounded up to `ROW_ALIGN` and cut into chunks of at most `MAX_CHUNK_ROWS` (200 ->
    [128, 80]): the shapes oneDNN caches and compiles stay the few of `ROW_SHAPES`."""
    if rows <= UNPADDED_ROWS:
        return [rows]
    if rows <= EXACT_ROWS:
        return [1 << (rows - 1).bit_length()]
    padded = -(-rows // ROW_ALIGN) * ROW_ALIGN
    full, rest = divmod(padded, MAX_CHUNK_ROWS)
    return [MAX_CHUNK_ROWS] * full + ([rest] if rest else [])


ROW_SHAPES = tuple(
    sorted(
        {*range(1, UNPADDED_ROWS + 1)}
        | {1 << i for i in range(EXACT_ROWS.bit_length())}
        | {*range(ROW_ALIGN, MAX_CHUNK_ROWS + 1, ROW_ALIGN)}
    )
)
"""Every row count `row_chunks` runs a packed product in (13 with the defaults)."""


def _packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


def _packed_in_few_shapes(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    chunks = row_chunks(rows)
    if chunks == [rows]:
        return _packed(x, weight, bias)
    flat = F.pad(x.reshape(rows, width), (0, 0, 0, sum(chunks) - rows))
    outs = [_packed(part, weight, bias) for part in torch.split(flat, chunks)]
    full = torch.cat(outs) if len(outs) > 1 else outs[0]
    return full[:rows].reshape(*x.shape[:-1], full.shape[-1])


def weight_bytes(weight: Weight) -> int:
    """Bytes a weight holds resident (what placement and config validation count)."""
    if isinstance(weight, Int8Weight):
        return weight.q.numel() + weight.scales.numel() * weight.scales.element_size()
    if isinstance(weight, BlockedWeight):  # its rows, not the zeros padding its last block
        scales = weight.scales
        held = 0 if scales is None else scales.numel() * scales.element_size()
        rows = weight.out_features * int(weight.blocks.shape[1])
        return held + rows * weight.blocks.element_size()
    return weight.numel() * weight.element_size()
