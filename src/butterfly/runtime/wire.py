"""Tensors to and from bytes for the network: a msgpack header plus the raw buffer.

Layout: 4-byte big-endian header length, msgpack `{"dtype": str, "shape": [int]}`, data.
Nothing is unpickled; the size implied by the header is checked against the limit and the
actual payload before any tensor is allocated.
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass
from typing import Annotated

import msgpack
import msgspec
import torch

from butterfly.types.errors import WireFormatError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
_LEN = struct.Struct(">I")
MAX_HEADER = 1024
MAX_DIMS = 8
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def encode_tensor(t: torch.Tensor) -> bytes:
    """The bytes are copied straight from the tensor's memory (`ctypes.string_at`), not
    through numpy and three tensor operations: every stage encodes its output on each
    step, and with the caches cold (4 node processes taking turns on 2 cores) that cost
    24 µs a tiny-model step, against 15 this way (AMD EPYC)."""
    if t.dtype not in _NAMES:
        raise WireFormatError(f"dtype {t.dtype} cannot be sent; allowed: {sorted(DTYPES)}")
    if not (t.is_cpu and t.is_contiguous()) or t.is_neg():  # a negated view: its memory is not
        t = t.resolve_neg().contiguous().cpu()  # its values
    size = t.numel() * t.element_size()
    raw = ctypes.string_at(t.data_ptr(), size) if size else b""
    return tensor_bytes(_NAMES[t.dtype], tuple(t.shape), raw)


def tensor_bytes(dtype: str, shape: tuple[int, ...], data: bytes) -> bytes:
    """The wire form of `data` as a tensor of `dtype` (a name in DTYPES) and `shape`."""
    header = _encode_header({"dtype": dtype, "shape": shape})
    return _LEN.pack(len(header)) + header + data


@dataclass(frozen=True)
class WireTensor:
    """A received tensor, checked but not yet a torch tensor: its dtype's wire name, its
    shape, the header as it came (length prefix included) and the data. A stage can run
    on the bytes themselves (runtime/fused_layers.py `run_floats`) and answer with the
    same header before new data, where a torch tensor's construction costs more than
    the step: each torch operation took 10-30 µs on caches another process had just
    flushed, against about one warm (AMD EPYC, docs/PERFORMANCE-LOG.md)."""

    dtype: str
    shape: tuple[int, ...]
    header: bytes
    data: memoryview

    def tensor(self) -> torch.Tensor:
        """A tensor of its own memory (the frame's bytes may be reused)."""
        if not self.data.nbytes:
            return torch.empty(self.shape, dtype=DTYPES[self.dtype])
        return torch.frombuffer(bytearray(self.data), dtype=DTYPES[self.dtype]).reshape(self.shape)


def read_tensor(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> WireTensor:
    """Check a tensor's bytes (layout, dtype, shape, size against `max_bytes` and against
    what the frame carries) without making a torch tensor of them."""
    view = memoryview(buf)
    if len(view) < _LEN.size:
        raise WireFormatError(f"tensor frame of {len(view)} bytes is shorter than its header")
    (hlen,) = _LEN.unpack_from(view)
    if hlen > MAX_HEADER or _LEN.size + hlen > len(view):
        raise WireFormatError(
            f"tensor header length {hlen} is invalid for a {len(view)}-byte frame"
        )
    name, shape = _header(view[_LEN.size : _LEN.size + hlen])
    nbytes = math.prod(shape) * _ITEMSIZE[name]
    if nbytes > max_bytes:
        raise WireFormatError(f"tensor of {nbytes} bytes exceeds the limit of {max_bytes}")
    start = _LEN.size + hlen
    data = view[start:]
    if len(data) != nbytes:
        raise WireFormatError(
            f"tensor {name}{list(shape)} needs {nbytes} bytes, frame carries {len(data)}"
        )
    return WireTensor(name, shape, bytes(view[:start]), data)


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    """The header as `checked_header` checks it, decoded and checked in C: a relaying
    node reads one per step, on caches another process has flushed (the frame's own
    header likewise: net.framing)."""

    dtype: str
    shape: Annotated[
        tuple[Annotated[int, msgspec.Meta(ge=0)], ...], msgspec.Meta(max_length=MAX_DIMS)
    ]


_decode_header = msgspec.msgpack.Decoder(_Header).decode
_encode_header = msgspec.msgpack.Encoder().encode


def _header(data: memoryview) -> tuple[str, tuple[int, ...]]:
    """The tensor's dtype name and shape; WireFormatError naming what is wrong."""
    try:
        header = _decode_header(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return checked_header(data)  # raises, naming the problem
    except RecursionError:  # msgspec walks a nested value up to the recursion limit
        raise WireFormatError("tensor header nests too deeply") from None
    if header.dtype not in DTYPES:
        raise WireFormatError(f"tensor dtype {header.dtype!r} is not one of {sorted(DTYPES)}")
    return header.dtype, header.shape


def checked_header(data: memoryview | bytes) -> tuple[str, tuple[int, ...]]:
    """`_header` field by field in Python, for the error that names the problem."""
    try:
        header = msgpack.unpackb(data, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireFormatError(f"tensor header is not valid msgpack: {e}") from e
    if not isinstance(header, dict) or set(header) != {"dtype", "shape"}:
        raise WireFormatError("tensor header must be a map with exactly 'dtype' and 'shape'")
    name = header["dtype"]
    if not isinstance(name, str) or name not in DTYPES:
        raise WireFormatError(f"tensor dtype {name!r} is not one of {sorted(DTYPES)}")
    shape = header["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise WireFormatError(f"tensor shape {shape!r} must be at most {MAX_DIMS} sizes >= 0")
    return name, tuple(shape)


def decode_tensor(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    return read_tensor(buf, max_bytes).tensor()
