"""Matrix products of a stage, with large fp32 weights packed once for oneDNN.

`F.linear` on fp32 goes to MKL, which on this project's AMD EPYC (AVX-512) runs its AVX2
code: measured 80-100 GFLOP/s per core on a [192, 768] x [768, 3072] product and 12-16 GB/s
on a decode step's matrix-vector products. oneDNN's kernels on the same weights, packed
once at load into its blocked layout, ran that product 2.3-2.6x faster and the
matrix-vector products 1.5-2.2x faster, with results equal to 1e-5 relative and
independent of the batch a row is in (docs/PERFORMANCE.md, "Packed weights"). A packed
call costs about 11 us more, so small matrices (the tiny demo model's) stay plain.

oneDNN builds a primitive per shape of a product, and its primitive cache and ideep's
(1024 entries each) keep it together with a buffer the size of the product's output:
measured 0.75 MB per new row count at 20 rows of a [768 -> 6144] product, 6.1 MB at 250,
about 40 KB per row for the small model's four packed weights together. Every new prompt
length added one, and a node under mixed prompt lengths grew 23-33 MB/min
(bench/soak.py); over a 2048-token context the caches could have held about 1 GB. So a
packed product runs its rows in few shapes (`row_chunks`): up to `EXACT_ROWS` (decode
batches) as they are, above that padded to a multiple of `ROW_ALIGN` and cut into
chunks of at most `MAX_CHUNK_ROWS`: 23 shapes per weight whatever the length, about
28 MB of cached buffers for the small model. Rows are computed independently (a row's
result does not depend on its batch, tests/test_linear.py), so padding rows only cost
their compute and are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# below this many elements (1 MiB of fp32) the call overhead outweighs the faster kernel
PACK_MIN_ELEMENTS = 1 << 18
# products with at most this many rows (decode steps of a batch) keep their own shape
EXACT_ROWS = 16
# longer products are padded to a multiple of this and run in chunks of at most
# MAX_CHUNK_ROWS; 128 rows of the small model's largest product is 0.6 GFLOP, enough
# for the kernel's blocking, so chunking costs only the ~12 us of one more call each
ROW_ALIGN = 16
MAX_CHUNK_ROWS = 128


def packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(  # type: ignore[no-untyped-call]
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's layout when that is faster, else unchanged."""
    if (
        weight.dtype != torch.float32
        or weight.dim() != 2
        or weight.numel() < PACK_MIN_ELEMENTS
        or not packing_available()
    ):
        return weight
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
    return packed


def row_chunks(rows: int) -> list[int]:
    """The row counts a packed product of `rows` rows runs as: `[rows]` up to
    `EXACT_ROWS`, else `rows` rounded up to `ROW_ALIGN` and cut into chunks of at most
    `MAX_CHUNK_ROWS` (200 -> [128, 80]), so the shapes oneDNN caches stay few."""
    if rows <= EXACT_ROWS:
        return [rows]
    padded = -(-rows // ROW_ALIGN) * ROW_ALIGN
    full, rest = divmod(padded, MAX_CHUNK_ROWS)
    return [MAX_CHUNK_ROWS] * full + ([rest] if rest else [])


def _packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, for plain or packed weights."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    chunks = row_chunks(rows)
    if chunks == [rows]:
        return _packed(x, weight, bias)
    flat = F.pad(x.reshape(rows, width), (0, 0, 0, sum(chunks) - rows))
    outs = [_packed(part, weight, bias) for part in torch.split(flat, chunks)]
    full = torch.cat(outs) if len(outs) > 1 else outs[0]
    return full[:rows].reshape(*x.shape[:-1], full.shape[-1])
