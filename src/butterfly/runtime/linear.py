"""Matrix products of a stage, with large fp32 weights packed once for oneDNN.

`F.linear` on fp32 goes to MKL, which on this project's AMD EPYC (AVX-512) runs its AVX2
code: measured 80-100 GFLOP/s per core on a [192, 768] x [768, 3072] product and 12-16 GB/s
on a decode step's matrix-vector products. oneDNN's kernels on the same weights, packed
once at load into its blocked layout, ran that product 2.3-2.6x faster and the
matrix-vector products 1.5-2.2x faster, with results equal to 1e-5 relative and
independent of the batch a row is in (docs/PERFORMANCE.md, "Packed weights"). A packed
call costs about 11 us more, so small matrices (the tiny demo model's) stay plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# below this many elements (1 MiB of fp32) the call overhead outweighs the faster kernel
PACK_MIN_ELEMENTS = 1 << 18


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, for plain or packed weights."""
    if weight.is_mkldnn:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)
