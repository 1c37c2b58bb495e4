"""A llama stage's decoder layers in one compiled call (runtime/llama_layers.c), for steps
of a few rows on fp32 or bf16 weights that the measured kernel choice put in the blocked
layout.

Why: with the products at the memory's read bandwidth (runtime/native.py), a decode
step of the small model still spent about 4.7 ms of its 18.9 ms per token outside them
(AMD EPYC, docs/PERFORMANCE-LOG.md): some forty torch operations per layer, each a trip
through Python and the dispatcher and, for the products, a fork and join of the thread
team. On a machine where several stages share the cores, each of those wakes is also a
chance to wait for a core. The compiled call runs every layer of the stage in one
parallel region.

When it runs (`plan`, `fits`): fp32 or bf16 compute, with matrices in it or int8 ones
(model.quantization), every matrix of the stage blocked, an activation it
knows, at most `MAX_ROWS` rows (decode batches, speculative verification, prompt chunks)
and caches of batch 1. Anything else takes llama.py's torch operations, which stay the
reference: tests/test_fused_layers.py holds the two equal on every variant the family
loads (biases, grouped-query attention, q/k norm, each activation, packed entries of
different lengths). Its attention is a plain loop over the cached positions, quadratic
in a long prompt: a whole prompt runs on torch's attention instead.

In bf16 it computes in fp32 with the weights' exact bf16 values and rounds the stage's
output and the cached keys and values to bf16, where torch's bf16 operations round after
each one: the two agree to bf16's precision, not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from butterfly.runtime import native
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.native import BlockedWeight
from butterfly.runtime.stage import check_id_range

if TYPE_CHECKING:
    from butterfly.runtime.llama_args import Block, LlamaArgs

MAX_ROWS = 64
DTYPES = (torch.float32, torch.bfloat16)  # the compute dtype
WEIGHT_TYPES = (torch.float32, torch.bfloat16, torch.int8)  # the matrices', as in the C
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "relu": 3}


@dataclass(frozen=True)
class FusedLayers:
    """What the compiled call needs that does not change between steps: each layer's
    tensor addresses, and the tensors themselves, kept alive while the table is."""

    table: torch.Tensor  # [L, 16] int64 addresses, 0 for an absent tensor
    tensors: tuple[torch.Tensor, ...]
    args: LlamaArgs
    function: Any  # the library's butterfly_llama_layers_f32
    weight_type: int  # of the four matrices: WEIGHT_TYPES in llama_layers.c's order
    layers: int = field(init=False)
    table_address: int = field(init=False)  # asked of the tensor once, not every step

    def __post_init__(self) -> None:
        if self.table.dtype != torch.int64 or not self.table.is_contiguous():
            raise ValueError("the layers' table is contiguous int64 addresses")
        object.__setattr__(self, "layers", int(self.table.shape[0]))
        object.__setattr__(self, "table_address", int(self.table.data_ptr()))


def could_plan(args: LlamaArgs) -> bool:
    """Whether layers of this architecture and precision can run in the compiled call,
    their matrices blocked: what `plan` asks of the args alone."""
    if args.dtype not in DTYPES or args.activation not in ACTIVATIONS:
        return False
    weights = torch.int8 if args.quantization == "int8" else args.dtype
    if not (native.available(args.dtype) and native.available(weights)):
        return False
    return not (args.head_dim % 2 or args.n_heads % args.n_kv_heads)


def plan(args: LlamaArgs, blocks: Sequence[Block]) -> FusedLayers | None:
    """The stage's table, or None where the compiled call does not apply."""
    if not blocks or not could_plan(args):
        return None
    weights = torch.int8 if args.quantization == "int8" else args.dtype
    lib = native.library()
    if lib is None:
        return None
    kept: list[torch.Tensor] = []

    def address(t: object) -> int:
        if t is None:
            return 0
        if isinstance(t, BlockedWeight):  # its own dtype; norms and biases in fp32
            tensor = t.blocks.contiguous()
        else:
            assert isinstance(t, torch.Tensor)
            tensor = t.to(torch.float32).contiguous()
        kept.append(tensor)
        return int(tensor.data_ptr())

    rows = []
    for blk in blocks:
        matrices = (blk.wqkv, blk.wo, blk.w13, blk.w2)
        if not all(isinstance(w, BlockedWeight) and w.dtype == weights for w in matrices):
            return None
        both = blk.q_norm is not None and blk.k_norm is not None  # as llama.py: both or none
        qk = (blk.q_norm, blk.k_norm) if both else (None, None)
        order = (blk.attn_norm, blk.wqkv, blk.bqkv, blk.wo, blk.bo, blk.mlp_norm, blk.w13)
        scales = [m.scales if isinstance(m, BlockedWeight) else None for m in matrices]
        rows.append([address(t) for t in (*order, blk.b13, blk.w2, blk.b2, *qk, *scales)])
    function = getattr(declared(lib), native.LAYERS_SYMBOL)
    table = torch.tensor(rows, dtype=torch.int64)
    return FusedLayers(table, tuple(kept), args, function, WEIGHT_TYPES.index(weights))


@functools.cache
def declared(lib: Any) -> Any:
    """The library with its three calls' C signatures set: once, where every plan set
    them again."""
    layers = getattr(lib, native.LAYERS_SYMBOL)
    layers.restype = ctypes.c_int
    layers.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p]
    layers.argtypes += [*[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64]
    layers.argtypes += [*[ctypes.c_void_p] * 5, ctypes.c_float, ctypes.c_int64]
    layers.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.butterfly_embed_rows.restype = None
    lib.butterfly_embed_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.butterfly_embed_rows.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.butterfly_llama_head.restype = ctypes.c_int
    lib.butterfly_llama_head.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.butterfly_llama_head.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_float]
    lib.butterfly_llama_head.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.butterfly_llama_head.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


@dataclass(frozen=True)
class Ends:
    """A first or last stage's own ends, run beside the compiled layers: the embedding
    table's rows copied into the layers' input (`embed_rows`), and the final norm and
    head on their output (`head_rows`). A decode step on one node is then three compiled
    calls and a few tensors made to hold their rows (none at all on fp32's bytes path,
    `LlamaStage.forward_floats`). Why: on torch, with the caches the weights' stream had
    just flushed, the embedding, the norm's five operations and the head's product
    around its kernel took 0.25-0.35 ms of a 7.5 ms bf16 decode step of the small model
    (AMD EPYC, nineteenth session, docs/PERFORMANCE-LOG.md); a compiled call takes a
    few µs besides its product."""

    embed: torch.Tensor | None  # [vocab, dim], contiguous, fp32 or bf16; None: not here
    table_bytes: memoryview | None  # an fp32 table's memory, for a few rows copied by Python
    norm: torch.Tensor | None  # the final norm's weight, fp32; None with no head here
    head: BlockedWeight | None
    scales: torch.Tensor | None  # an int8 head's, fp32
    args: LlamaArgs
    library: Any


def plan_ends(
    args: LlamaArgs, embed: torch.Tensor | None, norm: torch.Tensor | None, head: object
) -> Ends | None:
    """The stage's compiled ends, or None where the library is absent. An embedding table
    it cannot read row by row, or a head on another kernel (a shape torch's int8 product
    runs faster, say), stays with torch: that end's field is None."""
    lib = native.library()
    if lib is None or args.dtype not in DTYPES:
        return None
    readable = (
        embed is not None
        and embed.dtype == args.dtype
        and not embed.requires_grad
        and tuple(embed.shape) == (args.vocab_size, args.dim)
        and embed.is_contiguous()
    )
    table = embed if readable else None
    blocked = head if isinstance(head, BlockedWeight) else None
    if blocked is None or blocked.dtype not in WEIGHT_TYPES or norm is None:
        blocked = None
    if blocked is not None and not native.available(blocked.dtype):
        blocked = None
    scales = None
    if blocked is not None and blocked.scales is not None:
        scales = blocked.scales.to(torch.float32).contiguous()
    weight = None if blocked is None or norm is None else norm.to(torch.float32).contiguous()
    lib = declared(lib)
    as_bytes = None
    if table is not None and table.dtype == torch.float32:  # a view keeps the tensor alive
        as_bytes = table.numpy().data.cast("B")
    return Ends(table, as_bytes, weight, blocked, scales, args, lib)


def embed_rows(ends: Ends, ids: Sequence[int], out: int) -> None:
    """The embedding rows of `ids` into fp32 [len(ids), dim] at address `out`; the ids
    checked against the vocabulary first (InvalidInput naming them)."""
    table = ends.embed
    if table is None:
        raise ValueError("this stage's embedding table is not read by the compiled call")
    if ids:
        check_id_range(min(ids), max(ids), ends.args.vocab_size)
    chosen = array("q", ids)
    bf16 = table.dtype == torch.bfloat16
    ends.library.butterfly_embed_rows(
        start_of(chosen), len(chosen), table.data_ptr(), bf16, ends.args.dim, out
    )


def head_rows(ends: Ends, h: int, rows: Sequence[int], out: int) -> None:
    """The final norm and head on rows `rows` of the fp32 [*, dim] layers' output at
    address `h`, into [len(rows), vocab] at `out`: bf16 for a bf16 stage (rounded as
    torch's operations round), else fp32."""
    head, norm = ends.head, ends.norm
    if head is None or norm is None:
        raise ValueError("this stage's head is not run by the compiled call")
    a, chosen = ends.args, array("q", rows)
    status = ends.library.butterfly_llama_head(
        h, a.dim, start_of(chosen), len(chosen), norm.data_ptr(), a.norm_eps,
        head.blocks.data_ptr(), WEIGHT_TYPES.index(head.dtype),
        ends.scales.data_ptr() if ends.scales is not None else None,
        head.out_features, a.dtype == torch.bfloat16, out,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("no memory for the head's scratch buffers")


def fits(fused: FusedLayers, rows: int, caches: Sequence[KVCache]) -> bool:
    """Whether a step of `rows` rows on `caches` can run compiled: few rows, and caches
    of this stage's shape, each named once (two entries on one cache would write the
    same positions from two threads)."""
    a = fused.args
    return (
        0 < rows <= MAX_ROWS
        and len({id(c) for c in caches}) == len(caches)
        and all(
            (c.batch, c.kv_heads, c.head_dim, c.num_layers, c.dtype)
            == (1, a.n_kv_heads, a.head_dim, fused.layers, a.dtype)
            for c in caches
        )
    )


def run(
    fused: FusedLayers,
    h: torch.Tensor,
    caches: Sequence[KVCache],
    entries: Sequence[int],
    positions: Sequence[int],
    cos: torch.Tensor,
    sin: torch.Tensor,
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """h [M, D] through every layer: row m of entry `entries[m]` (an index into `caches`)
    at position `positions[m]`; `cos`, `sin` are the rotary tables [positions, Dh], fp32,
    read at each row's position by the call. Writes the rows' keys and values into their
    caches (their lengths are the caller's to advance) and, with `trace`, appends h after
    each layer. Returns fp32 (and fp32 traces) whatever the model's dtype: the arithmetic
    is fp32 throughout, bf16 weights widened as they are read; the caller rounds once.

    Runs once per step on every node, so the call's small arrays are `array`s, not torch
    tensors (a few microseconds each through the dispatcher), and the rotary rows are
    not gathered here: the tiny model's one-layer step took 68 microseconds before,
    44-45 after (AMD EPYC, eighth session)."""
    rows, dim = len(positions), fused.args.dim
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError("the rotary tables of the fused layers are fp32")
    cos, sin = cos.contiguous(), sin.contiguous()
    rotary = (cos.data_ptr(), sin.data_ptr(), min(cos.shape[0], sin.shape[0]))
    out = h.reshape(rows, dim).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    run_rows(fused, out, caches, entries, positions, rotary, trace)
    return out


def run_rows(
    fused: FusedLayers,
    h: torch.Tensor,
    caches: Sequence[KVCache],
    entries: Sequence[int],
    positions: Sequence[int],
    rotary: Rotary,
    trace: list[torch.Tensor] | None = None,
) -> None:
    """`run` in place on `h`, fp32 [M, D] and contiguous (the caller's own copy)."""
    rows, dim = len(positions), fused.args.dim
    if h.dtype != torch.float32 or not h.is_contiguous() or h.shape != (rows, dim):
        raise ValueError(f"the fused layers run in place on contiguous fp32 [{rows}, {dim}]")
    kept = torch.empty(fused.layers, rows, dim) if trace is not None else None
    _call(fused, h.data_ptr(), caches, entries, positions, rotary, kept)
    if trace is not None and kept is not None:
        trace.extend(kept.unbind(0))


Rotary = tuple[int, int, int]
"""The fp32 rotary tables as the compiled call reads them: the cos and sin tables'
addresses and how many positions they hold (runtime/llama.py keeps them with the tables,
`run` takes them from tensors)."""


def run_floats(
    fused: FusedLayers,
    h: array[float],
    caches: Sequence[KVCache],
    positions: Sequence[int],
    rotary: Rotary,
) -> None:
    """`run` for rows of one position each, entry m at `positions[m]` on `caches[m]`, in
    place on `h` ([M, D] fp32 in an `array`): no torch operation at all, the stage's
    input read from and its output written to plain memory. A middle stage of a decode
    step on 4 node processes sharing 2 cores starts with caches the others flushed, and
    each torch operation then cost 10-30 µs (a tensor's decoding 48, the copy into fp32
    31, `inference_mode` 26) where the compiled layers of a tiny stage take 50 (AMD
    EPYC, docs/PERFORMANCE-LOG.md, thirteenth session)."""
    if h.itemsize != 4 or h.typecode != "f":
        raise TypeError("run_floats takes the rows as an array of C floats")
    if len(h) != len(positions) * fused.args.dim:
        raise ValueError(f"{len(h)} floats are not {len(positions)} rows of {fused.args.dim}")
    _call(fused, start_of(h), caches, range(len(positions)), positions, rotary, None)


def _call(
    fused: FusedLayers,
    out: int,
    caches: Sequence[KVCache],
    entries: Sequence[int],
    positions: Sequence[int],
    rotary: Rotary,
    kept: torch.Tensor | None,
) -> None:
    """The compiled call on the fp32 rows at address `out`, in place."""
    a = fused.args
    cos, sin, tabled = rotary
    if max(positions) >= tabled or min(positions) < 0:
        raise ValueError(f"positions up to {max(positions)} are past the rotary tables' {tabled}")
    ends: dict[int, int] = {}
    for e, p in zip(entries, positions, strict=True):
        ends[e] = max(ends.get(e, 0), p + 1)
    for e, end in ends.items():
        caches[e].reserve(end)
    # held until the call returns: a cache that grows meanwhile (a standby's copy being
    # extended from the event loop) frees its old tensors, which the call still writes;
    # their capacity comes with them, the row stride the call writes them at
    held = [cache.storage for cache in caches]
    for e, end in ends.items():
        if held[e].capacity < end:
            raise ValueError(f"position {end - 1} is past the cache's {held[e].capacity}")
    layers = fused.layers
    if len(held) == 1:
        pointers = array("q", held[0].addresses)
    else:  # [L][E][2]: each layer's key and value of every entry
        pairs = (s.addresses[2 * layer : 2 * layer + 2] for layer in range(layers) for s in held)
        pointers = array("q", [p for pair in pairs for p in pair])
    capacity = array("q", [s.capacity for s in held])
    entry, where = array("q", entries), array("q", positions)
    status = fused.function(
        out, len(positions), a.dim, layers, fused.table_address,
        a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate,
        start_of(pointers), len(caches), start_of(capacity),
        start_of(entry), start_of(where), cos, sin,
        a.norm_eps, ACTIVATIONS[a.activation], kept.data_ptr() if kept is not None else None,
        a.dtype == torch.bfloat16, fused.weight_type,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("no memory for the fused layers' scratch buffers")
    del held


def start_of(values: array[int] | array[float]) -> int:
    """Where an array's items start, for the compiled call (kept alive by the caller)."""
    return values.buffer_info()[0]
