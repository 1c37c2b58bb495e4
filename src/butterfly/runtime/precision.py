"""What a stage computes in: `model.dtype` and `model.quantization`, checked at load.

Weights are read in the dtype they are stored in and converted once, tensor by tensor, to
the compute dtype, so a bf16 checkpoint served in bf16 never passes through fp32 and a
stage holds exactly `parameters x bytes per element` (what config validation and
placement count, `weight_bytes`). int8 keeps every projection matrix as int8 with one
scale per output channel (symmetric, absmax / 127); embeddings, norms and biases stay in
the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from butterfly.types.errors import UnsupportedPrecision

Quantization = Literal["none", "int8"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8")
VERIFICATION_FLOORS: dict[str, float] = {"float32": 2**-12, "bfloat16": 2**-5, "float16": 2**-8}
"""How far two honest computations of one step may drift apart in each compute dtype, as a
share of the activations' scale: the auditor's one-pass prefill against the chain's
token-by-token decode, or two kernels (plain, packed) of the same product. Measured on the
demo models: bfloat16 up to 0.93% of the scale, float16 0.12%, float32 below 1e-4; each
floor is about 3x that (float32's was 0 until `byzantine.rtol = atol = 0`, which the schema
allows, had honest nodes evicted). int8 weights are quantized alike on every node and add
nothing."""


def verification_floor(dtype: str) -> float:
    """`VERIFICATION_FLOORS` for a `model.dtype` name (unknown names: the widest)."""
    return VERIFICATION_FLOORS.get(dtype, max(VERIFICATION_FLOORS.values()))


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype = torch.float32  # activations, caches, dense weights
    quantization: Quantization = "none"  # "int8": projection matrices as int8 + scales

    @classmethod
    def named(cls, dtype: str, quantization: str = "none") -> Precision:
        """From the config's names, refusing what this CPU cannot compute."""
        if dtype not in DTYPES:
            raise UnsupportedPrecision(f"model.dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if quantization not in QUANTIZATIONS:
            raise UnsupportedPrecision(
                f"model.quantization {quantization!r} is not one of {list(QUANTIZATIONS)}"
            )
        precision = cls(DTYPES[dtype], "int8" if quantization == "int8" else "none")
        probe(precision)
        return precision

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return dtype if self.quantization == "none" else f"{dtype}+{self.quantization}"


FP32 = Precision()

_PROBED: dict[Precision, None] = {}


def probe(precision: Precision) -> None:
    """Run the operations of a decoder layer once in `precision` and compare with fp32.

    A CPU build without kernels for a dtype raises (torch names the missing kernel) or
    returns garbage; either way the operator learns it at load, naming the setting,
    instead of from the first request. Memoised per process: the answer cannot change.
    """
    if precision in _PROBED or precision == FP32:
        return
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 64, generator=g), torch.randn(96, 64, generator=g) / 8
    q, k, v = (torch.randn(1, 2, 3, 16, generator=g) for _ in range(3))
    want = F.silu(F.linear(x, w)).sum() + F.scaled_dot_product_attention(q, k, v).sum()
    dt = precision.dtype
    try:
        if precision.quantization == "int8":
            qw, scales = quantize_int8(w)
            if int8_weight_kernel_available():
                y = torch._weight_int8pack_mm(x.reshape(-1, 64).to(dt), qw, scales.to(dt))
            else:
                y = F.linear(x.reshape(-1, 64).to(dt), dequantize_int8(qw, scales).to(dt))
            lin = y.reshape(2, 3, 96)
        else:
            lin = F.linear(x.to(dt), w.to(dt))
        att = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt))
        got = F.silu(lin).float().sum() + att.float().sum()
    except RuntimeError as e:
        raise UnsupportedPrecision(
            f"model.dtype {dt} is not supported by this CPU's torch build ({e}); "
            "use model.dtype float32"
        ) from e
    if not torch.isfinite(got) or abs(float(got - want)) > 0.05 * (1 + abs(float(want))):
        raise UnsupportedPrecision(
            f"model.{'quantization' if precision.quantization != 'none' else 'dtype'} "
            f"{precision.name}: the probe product gives {float(got):.4g}, fp32 "
            f"{float(want):.4g}; this CPU's kernels for it are unusable, use float32"
        )
    _PROBED[precision] = None


def int8_weight_kernel_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `weight ~= q * scales[:, None]`, |q| <= 127.

    Scales are fp32 here; the kernels take them in the compute dtype."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 matrix an int8 weight stands for: the reference the accuracy check and
    the golden tests compare the quantized stage with."""
    return q.float() * scales.float()[:, None]


def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded through int8 and back, in its own dtype."""
    return dequantize_int8(*quantize_int8(weight)).to(weight.dtype)
