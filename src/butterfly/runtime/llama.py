"""Llama-architecture decoder stage (also Mistral-, Qwen2- and Qwen3-style checkpoints):
its forward pass.

Weights are plain tensors, each matrix on the kernel measured fastest for its shape
(runtime/linear.py), and the forward pass is a few functions, as in gpt-fast's
`model.py`: a reader sees every operation of a stage top to bottom. Where they apply,
the layers run as one compiled call (runtime/fused_layers.py), checked against these
operations when planned. The architecture a config states is in runtime/llama_args.py,
reading a stage from a checkpoint in runtime/llama_load.py.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time
from array import array
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from butterfly.runtime import fused_layers
from butterfly.runtime.fused_layers import start_of
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.linear import Weight, linear
from butterfly.runtime.llama_args import ACTIVATIONS, Block, LlamaArgs, inv_frequencies
from butterfly.runtime.stage import (
    causal_mask,
    check_id_range,
    check_positions,
    check_token_ids,
)
from butterfly.runtime.wire import WireTensor, encode_tensor, tensor_bytes
from butterfly.types.model import LayerRange

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaStage:
    input_kind = "tokens"

    def __init__(
        self,
        args: LlamaArgs,
        layers: LayerRange,
        blocks: list[Block],
        embed: torch.Tensor | None,
        norm: torch.Tensor | None,
        head: Weight | None,
    ) -> None:
        self.args, self.layers, self.blocks = args, layers, blocks
        self.embed, self.norm, self.head = embed, norm, head
        self.num_layers, self.max_context = args.n_layers, args.max_context
        self._inv_freq, self._rope_scale = inv_frequencies(args)
        self._act = ACTIVATIONS[args.activation]
        self._cos = self._sin = torch.empty(0, args.head_dim)
        self._cos32, self._sin32 = self._cos, self._sin  # fp32, for the fused layers
        self._rotary: fused_layers.Rotary = (0, 0, 0)  # theirs, as the call reads them
        self._ends_seen: tuple[object, object, object, fused_layers.Ends | None] | None = None

    @functools.cached_property
    def _fused(self) -> fused_layers.FusedLayers | None:
        """The compiled layers' table, planned at the first step; None where they do not
        apply, or where they do not compute what torch's operations compute on this
        machine (and what a caller sets to keep this stage on torch's operations)."""
        fused = fused_layers.plan(self.args, self.blocks)
        if fused is not None and not self._compiled_agrees(fused):
            log.warning(
                "layers %s: the compiled layers disagree with torch's operations on this "
                "machine; the stage runs on torch's operations",
                self.layers,
            )
            return None
        return fused

    def _compiled_agrees(self, fused: fused_layers.FusedLayers) -> bool:
        """Whether the compiled call gives what the torch operations give, with this
        stage's own weights, for a 3-row prompt and a decode row after it. Checked once,
        when planned: the C source is compiled on the machine that runs it
        (runtime/native.py), so a compiler or a CPU it was never tested on must cost
        speed, never answers (the blocked products check themselves alike,
        `native._agrees`). A wrong kernel is off by the activations' own scale; the
        bound leaves room for bf16's rounding, which the two paths do at different
        points (runtime/fused_layers.py), a few percent of it."""
        a = self.args
        bound = 1e-3 if a.dtype == torch.float32 else 5e-2
        g = torch.Generator().manual_seed(0)
        torch_cache, compiled_cache = self.new_cache(), self.new_cache()
        start = 0
        with torch.inference_mode():
            for rows in (3, 1):
                x = torch.randn(1, rows, a.dim, generator=g).to(a.dtype)
                rope = [self._rope(start, rows)]
                want = self._torch_layers(x, [torch_cache], [start], rope, None).float()
                positions = list(range(start, start + rows))
                tables = self._cos32, self._sin32
                got = fused_layers.run(
                    fused, x, [compiled_cache], [0] * rows, positions, *tables, None
                ).view(x.shape)
                start += rows
                for cache in (torch_cache, compiled_cache):
                    cache.advance(start)
                error = (got.to(a.dtype).float() - want).abs().max()
                if not bool(error <= bound * (1 + want.abs().max())):  # False for a NaN too
                    return False
        return True

    def decode_micros(self, steps: int, position: int) -> tuple[float, float] | None:
        """Microseconds of one decode row at `position` (the caches hold as many before
        it) through the stage's layers on torch's operations and in the compiled call,
        the best of `steps` of each taken in turn; None where the compiled call does not
        apply. What `llama_load.fused_saving_us` weighs."""
        fused = self._fused
        if fused is None:
            return None
        a = self.args
        x = torch.randn(1, 1, a.dim, generator=torch.Generator().manual_seed(0)).to(a.dtype)
        rope = [self._rope(position, 1)]
        torch_cache, compiled_cache = self.new_cache(), self.new_cache()
        for cache in (torch_cache, compiled_cache):
            cache.reserve(position + 1)
            for t in (*cache.storage.keys, *cache.storage.values):
                t.zero_()  # its storage is torch.empty: no stray NaN or denormal to time
            cache.advance(position)
        best = [math.inf, math.inf]
        with torch.inference_mode():
            for _ in range(steps):  # each step writes the same position again: the same work
                t0 = time.perf_counter()
                self._torch_layers(x, [torch_cache], [position], rope, None)
                t1 = time.perf_counter()
                fused_layers.run(fused, x.view(1, a.dim), [compiled_cache], [0], [position],
                                 self._cos32, self._sin32, None)  # fmt: skip
                t2 = time.perf_counter()
                best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
        return best[0] * 1e6, best[1] * 1e6

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.num_layers

    def new_cache(self, batch: int = 1) -> KVCache:
        a = self.args
        return KVCache(len(self.blocks), batch, a.n_kv_heads, a.head_dim, a.max_context, a.dtype)

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._rope_to(start + length)
        return self._cos[start : start + length], self._sin[start : start + length]

    def _rope_to(self, end: int) -> None:
        """The rotary tables hold positions below `end` (the fused call reads them whole;
        slices of them, `_rope`, are for torch's operations only)."""
        if end > self._cos.shape[0]:
            n = min(self.max_context, max(end, 2 * self._cos.shape[0], 256))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            scale, dtype = self._rope_scale, self.args.dtype
            self._cos, self._sin = (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
            # the values the torch path uses (rounded to the dtype), widened once
            self._cos32, self._sin32 = self._cos.float(), self._sin.float()
            self._rotary = (self._cos32.data_ptr(), self._sin32.data_ptr(), n)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        start_pos: int,
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if cache is None:
            raise ValueError("a decoder stage needs its KV cache (stage.new_cache())")
        return self.forward_rows(x, [cache], [start_pos], last_only=last_only, trace=trace)

    def forward_rows(
        self,
        x: torch.Tensor,
        caches: Sequence[KVCache],
        starts: Sequence[int],
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Row b of `x` is request b, with its own cache and start position; all rows have
        T tokens. Decode steps of concurrent requests run as one batch this way: one set of
        matrix products for B tokens instead of B sets, which is where the throughput of
        many short requests comes from."""
        if any(c is None for c in caches):  # stage.forward_rows passes a family's own
            raise ValueError("a decoder stage needs its KV cache (stage.new_cache())")
        batch, length = int(x.shape[0]), int(x.shape[1])
        if self._fused_fits(batch * length, caches):
            for start in starts:
                check_positions(start, length, self.max_context)
            h = self._fused_input(x)
            self._run_fused(h, caches, starts, [length] * batch, trace, (batch, length))
            last = [b * length + length - 1 for b in range(batch)] if last_only else None
            return self._fused_output(h, (batch, length), last)
        if self.embed is not None:
            check_token_ids(x, self.args.vocab_size)
            h = F.embedding(x, self.embed)  # [B, T, D]
        else:
            h = x.to(self.args.dtype)
        for start in starts:
            check_positions(start, length, self.max_context)
        rope = [self._rope(start, length) for start in starts]  # each [T, Dh]
        h = self._torch_layers(h, caches, starts, rope, trace)
        eps = self.args.norm_eps
        for cache, start in zip(caches, starts, strict=True):
            cache.advance(start + length)
        if self.head is None:
            return h
        if last_only:
            h = h[:, -1:]
        return linear(rms_norm(h, self.norm, eps), self.head)  # type: ignore[arg-type]

    def forward_floats(
        self, x: WireTensor, caches: Sequence[KVCache], starts: Sequence[int]
    ) -> bytes | None:
        """Decode rows as they came off the wire (`x` [1, B] token ids on a first stage,
        fp32 [1, B, D] otherwise; row b one position of request b at `starts[b]`),
        answered as bytes for the wire: the embedding rows copied from the table's
        memory, the layers in one compiled call in place on the rows, and a last stage's
        norm and head in another (`fused_layers.head_rows`; on torch where it does not
        apply). None, before anything is done, where this does
        not apply (bf16, no compiled layers, a batch they do not take): `forward_rows`
        then. Equal to it bit for bit where both run (tests/test_fused_layers.py): the
        same call on the same fp32 rows."""
        a, rows = self.args, len(starts)
        if a.dtype != torch.float32:
            return None
        fused = self._fused
        if fused is None or not fused_layers.fits(fused, rows, caches):
            return None
        if self.embed is None:
            if x.dtype != "float32" or x.shape != (1, rows, a.dim):
                return None
            h = array("f")
            h.frombytes(x.data)  # a copy: the frame's bytes stay as they came
        else:
            ends = self._ends
            table = ends.table_bytes if ends is not None else None  # an fp32 table's
            if table is None or x.dtype not in ("int64", "int32") or x.shape != (1, rows):
                return None
            ids = array("q" if x.dtype == "int64" else "i")
            ids.frombytes(x.data)
            check_id_range(min(ids), max(ids), a.vocab_size)
            h, width = array("f"), a.dim * 4
            for i in ids:  # a row or a few: faster than a compiled call (0.4 against 2 µs)
                h.frombytes(table[i * width : (i + 1) * width])
        for start in starts:
            check_positions(start, 1, self.max_context)
        self._rope_to(max(starts) + 1)
        fused_layers.run_floats(fused, h, caches, starts, self._rotary)
        for cache, start in zip(caches, starts, strict=True):
            cache.advance(start + 1)
        if self.head is None:
            if self.embed is None:  # the same dtype and shape as the input
                return x.header + h.tobytes()
            return tensor_bytes("float32", (1, rows, a.dim), h.tobytes())
        ends = self._ends
        if ends is None or ends.head is None:
            out = torch.frombuffer(h, dtype=torch.float32).view(1, rows, a.dim)
            return encode_tensor(linear(rms_norm(out, self.norm, a.norm_eps), self.head))  # type: ignore[arg-type]
        logits = array("f", [0.0]) * (rows * ends.head.out_features)
        fused_layers.head_rows(ends, start_of(h), range(rows), start_of(logits))
        return tensor_bytes("float32", (1, rows, ends.head.out_features), logits.tobytes())

    @property
    def _ends(self) -> fused_layers.Ends | None:
        """The stage's embedding and head beside the compiled layers, planned at the first
        step and again if the stage's table, norm or head is replaced; a compiled head
        that does not compute what torch's operations compute on this machine is left
        out (the head then runs on torch)."""
        seen = self._ends_seen  # every step asks: compared field by field, not in a loop
        if seen is None or not (
            seen[0] is self.embed and seen[1] is self.norm and seen[2] is self.head
        ):
            seen = self._ends_seen = (self.embed, self.norm, self.head, self._plan_ends())
        return seen[3]

    def _plan_ends(self) -> fused_layers.Ends | None:
        ends = fused_layers.plan_ends(self.args, self.embed, self.norm, self.head)
        if ends is not None and ends.head is not None and not self._head_agrees(ends):
            log.warning(
                "layers %s: the compiled head disagrees with torch's operations on this "
                "machine; the head runs on torch's operations",
                self.layers,
            )
            return dataclasses.replace(ends, head=None)
        return ends

    def _torch_layers(
        self,
        h: torch.Tensor,
        caches: Sequence[KVCache],
        starts: Sequence[int],
        rope: Sequence[tuple[torch.Tensor, torch.Tensor]],
        trace: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """`h` [B, T, D] through every layer on torch's operations: row b from
        `starts[b]`, with `rope[b]` its positions' cos and sin."""
        length, eps = h.shape[1], self.args.norm_eps
        cos = torch.stack([c for c, _ in rope]).unsqueeze(1)  # [B, 1, T, Dh]
        sin = torch.stack([s for _, s in rope]).unsqueeze(1)
        masks = [causal_mask(start, length) for start in starts]
        for i, blk in enumerate(self.blocks):
            a = rms_norm(h, blk.attn_norm, eps)
            h = h + self._attention(blk, a, caches, i, starts, cos, sin, masks)
            h = h + self._mlp(blk, rms_norm(h, blk.mlp_norm, eps))
            if trace is not None:  # per-layer outputs, for the Merkle root of a proof
                trace.append(h)
        return h

    def forward_packed(
        self,
        x: torch.Tensor,
        caches: Sequence[KVCache],
        starts: Sequence[int],
        lengths: Sequence[int],
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Entries of different lengths side by side in one sequence: `x` [1, N] (or
        [1, N, D]) holds entry i's `lengths[i]` positions from `starts[i]`, in order.
        Every matrix product runs once over all N rows, attention per entry against its
        own cache. A prompt's chunk and the decode steps batched with it then read the
        weights once between them instead of once each: run apart, a 32-position chunk
        of three small-model layers cost a whole 4-row decode step more (14.5 ms of one
        thread's CPU) than its own rows (0.36 ms each; docs/PERFORMANCE-LOG.md, chunked
        prefill). Returns [1, N] rows, or with `last_only` each entry's last row."""
        for start, length in zip(starts, lengths, strict=True):
            check_positions(start, length, self.max_context)
        if self._fused_fits(sum(lengths), caches):
            h = self._fused_input(x)
            self._run_fused(h, caches, starts, lengths, trace, (1, sum(lengths)))
            ends = list(itertools.accumulate(lengths))
            last = [at - 1 for at in ends] if last_only else None  # each entry's last
            return self._fused_output(h, (1, sum(lengths)), last)
        if self.embed is not None:
            check_token_ids(x, self.args.vocab_size)
            h = F.embedding(x, self.embed)  # [1, N, D]
        else:
            h = x.to(self.args.dtype)
        eps = self.args.norm_eps
        rope = [self._rope(s, n) for s, n in zip(starts, lengths, strict=True)]
        cos = torch.cat([c for c, _ in rope])[:, None, :]  # [N, 1, Dh]
        sin = torch.cat([s for _, s in rope])[:, None, :]
        for i, blk in enumerate(self.blocks):
            a = rms_norm(h, blk.attn_norm, eps)
            h = h + self._packed_attention(blk, a, caches, i, starts, lengths, cos, sin)
            h = h + self._mlp(blk, rms_norm(h, blk.mlp_norm, eps))
            if trace is not None:
                trace.append(h)
        ends = [start + length for start, length in zip(starts, lengths, strict=True)]
        for cache, end in zip(caches, ends, strict=True):
            cache.advance(end)
        if self.head is None:
            return h
        if last_only:
            h = h[:, [at - 1 for at in itertools.accumulate(lengths)]]  # each entry's last
        return linear(rms_norm(h, self.norm, eps), self.head)  # type: ignore[arg-type]

    def _fused_fits(self, rows: int, caches: Sequence[KVCache]) -> bool:
        fused = self._fused
        return fused is not None and fused_layers.fits(fused, rows, caches)

    def _head_agrees(self, ends: fused_layers.Ends) -> bool:
        """Whether the compiled norm and head give torch's, on 3 random rows of the
        stage's width (as `_compiled_agrees` for the layers)."""
        a = self.args
        g = torch.Generator().manual_seed(0)
        h = torch.randn(3, a.dim, generator=g) * 4
        with torch.inference_mode():
            want = linear(rms_norm(h.to(a.dtype), self.norm, a.norm_eps), self.head).float()  # type: ignore[arg-type]
            got = torch.empty(3, want.shape[-1], dtype=a.dtype)
            fused_layers.head_rows(ends, h.data_ptr(), range(3), got.data_ptr())
        bound = 1e-4 if a.dtype == torch.float32 else 2e-2
        error = (got.float() - want).abs().max()
        return bool(error <= bound * (1 + want.abs().max()))  # False for a NaN too

    def _fused_input(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled layers' input for `x` (ids [B, T], or rows [B, T, D]): its own
        fp32 [B * T, D] memory, the embedding rows copied by the compiled call where it
        reads the table."""
        a, rows = self.args, int(x.shape[0]) * int(x.shape[1])
        if self.embed is None:
            rows_of = x.to(a.dtype).reshape(rows, a.dim)
            return rows_of.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        ends = self._ends
        if ends is None or ends.embed is None:
            check_token_ids(x, a.vocab_size)
            h = F.embedding(x, self.embed).reshape(rows, a.dim)
            return h.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if x.dtype not in (torch.int64, torch.int32):
            check_token_ids(x, a.vocab_size)  # raises, naming the dtype
        h = torch.empty(rows, a.dim)
        fused_layers.embed_rows(ends, x.reshape(-1).tolist(), h.data_ptr())
        return h

    def _fused_output(
        self, h: torch.Tensor, shape: tuple[int, int], rows: Sequence[int] | None
    ) -> torch.Tensor:
        """What the stage answers for the compiled layers' fp32 output `h` [N, D], N =
        shape[0] * shape[1]: every row in the stage's dtype, [*shape, D]; or on a last
        stage the logits of `rows` (every row if None), [shape[0], rows per batch row,
        vocab]."""
        a = self.args
        if self.head is None:
            return h.view(*shape, a.dim).to(a.dtype)
        chosen = range(int(h.shape[0])) if rows is None else rows
        out_shape = (shape[0], len(chosen) // shape[0], -1)
        ends = self._ends
        if ends is None or ends.head is None:
            kept = h if rows is None else h[list(rows)]
            normed = rms_norm(kept.to(a.dtype), self.norm, a.norm_eps)  # type: ignore[arg-type]
            return linear(normed, self.head).view(out_shape)
        out = torch.empty(len(chosen), ends.head.out_features, dtype=a.dtype)
        fused_layers.head_rows(ends, h.data_ptr(), chosen, out.data_ptr())
        return out.view(out_shape)

    def _run_fused(
        self,
        h: torch.Tensor,
        caches: Sequence[KVCache],
        starts: Sequence[int],
        lengths: Sequence[int],
        trace: list[torch.Tensor] | None,
        shape: tuple[int, int],
    ) -> None:
        """`h` fp32 [N, D] in place through every layer in one compiled call
        (runtime/fused_layers.py): entry i's `lengths[i]` rows from `starts[i]`, in
        order; the caches advanced past them. `trace` gets each layer's output shaped
        [*shape, D] in the stage's dtype."""
        assert self._fused is not None
        self._rope_to(max(s + n for s, n in zip(starts, lengths, strict=True)))
        entries = [e for e, n in enumerate(lengths) for _ in range(n)]
        positions = [s + t for s, n in zip(starts, lengths, strict=True) for t in range(n)]
        layers: list[torch.Tensor] | None = [] if trace is not None else None
        fused_layers.run_rows(self._fused, h, caches, entries, positions, self._rotary, layers)
        if trace is not None and layers is not None:
            trace.extend(t.view(*shape, self.args.dim).to(self.args.dtype) for t in layers)
        for cache, start, length in zip(caches, starts, lengths, strict=True):
            cache.advance(start + length)

    def _packed_attention(
        self,
        blk: Block,
        x: torch.Tensor,
        caches: Sequence[KVCache],
        layer: int,
        starts: Sequence[int],
        lengths: Sequence[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`forward_packed`'s attention: q, k, v and the output projection over all rows;
        the single-position entries as one padded batch (`_decode_attention`), each longer
        one causally over its cache."""
        a = self.args
        rows = x.shape[1]
        q_size, kv_size = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        q, k, v = torch.split(linear(x, blk.wqkv, blk.bqkv), [q_size, kv_size, kv_size], -1)
        q = q[0].view(rows, a.n_heads, a.head_dim)  # [N, H, Dh]
        k = k[0].view(rows, a.n_kv_heads, a.head_dim)
        v = v[0].view(rows, a.n_kv_heads, a.head_dim)
        if blk.q_norm is not None and blk.k_norm is not None:  # Qwen3: per head, before RoPE
            q, k = rms_norm(q, blk.q_norm, a.norm_eps), rms_norm(k, blk.k_norm, a.norm_eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.empty(rows, a.n_heads, a.head_dim, dtype=q.dtype)
        offsets = [at - n for at, n in zip(itertools.accumulate(lengths), lengths, strict=True)]
        single = [i for i, n in enumerate(lengths) if n == 1]
        if single:
            at = [offsets[i] for i in single]
            # [B, H, 1, Dh] each, as a decode batch has them
            qs, ks, vs = (t[at].unsqueeze(2) for t in (q, k, v))
            picked = [caches[i] for i in single]
            done = self._decode_attention(picked, layer, [starts[i] for i in single], qs, ks, vs)
            out[at] = done[:, :, 0]
        for i, (cache, start, n) in enumerate(zip(caches, starts, lengths, strict=True)):
            if n == 1:
                continue
            part = slice(offsets[i], offsets[i] + n)
            qb, kb, vb = (t[part].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, Dh]
            kb, vb = cache.update(layer, start, kb, vb)  # [1, H_kv, S, Dh]
            if a.n_kv_heads != a.n_heads:
                kb = kb.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
                vb = vb.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
            mask = causal_mask(start, n)
            got = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None)
            out[part] = got[0].transpose(0, 1)
        return linear(out.reshape(1, rows, q_size), blk.wo, blk.bo)

    def _attention(
        self,
        blk: Block,
        x: torch.Tensor,
        caches: Sequence[KVCache],
        layer: int,
        starts: Sequence[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        a = self.args
        bsz, length, _ = x.shape
        q_size, kv_size = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        q, k, v = torch.split(linear(x, blk.wqkv, blk.bqkv), [q_size, kv_size, kv_size], -1)
        q = q.view(bsz, length, a.n_heads, a.head_dim)
        k = k.view(bsz, length, a.n_kv_heads, a.head_dim)
        if blk.q_norm is not None and blk.k_norm is not None:  # Qwen3: per head, before RoPE
            q, k = rms_norm(q, blk.q_norm, a.norm_eps), rms_norm(k, blk.k_norm, a.norm_eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Dh]
        v = v.view(bsz, length, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if length == 1 and bsz > 1:
            out = self._decode_attention(caches, layer, starts, q, k, v)
            return linear(out.transpose(1, 2).reshape(bsz, 1, q_size), blk.wo, blk.bo)
        rows = []
        for b, (cache, start, mask) in enumerate(zip(caches, starts, masks, strict=True)):
            kb, vb = cache.update(layer, start, k[b : b + 1], v[b : b + 1])  # [1, H_kv, S, Dh]
            if a.n_kv_heads != a.n_heads:
                kb = kb.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
                vb = vb.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
            rows.append(
                F.scaled_dot_product_attention(
                    q[b : b + 1], kb, vb, attn_mask=mask, is_causal=mask is None and length > 1
                )
            )
        out = rows[0] if bsz == 1 else torch.cat(rows)
        out = out.transpose(1, 2).reshape(bsz, length, q_size)
        return linear(out, blk.wo, blk.bo)

    def _decode_attention(
        self,
        caches: Sequence[KVCache],
        layer: int,
        starts: Sequence[int],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """One new token per row: the rows' keys padded to the longest cache and masked,
        so one attention call serves the batch instead of one per row (measured 0.13 ms
        per row per layer on the tiny model). A padded key scores -inf and so weighs
        exactly 0; the result matches the per-row path within float rounding."""
        a = self.args
        keys, values = [], []
        for b, (cache, start) in enumerate(zip(caches, starts, strict=True)):
            kb, vb = cache.update(layer, start, k[b : b + 1], v[b : b + 1])  # [1, H_kv, S, Dh]
            keys.append(kb[0].transpose(0, 1))  # [S, H_kv, Dh]
            values.append(vb[0].transpose(0, 1))
        mask = None
        if min(starts) != max(starts):
            ends = torch.tensor(starts).add_(1).unsqueeze(1)  # [B, 1]
            mask = (torch.arange(max(starts) + 1).unsqueeze(0) < ends)[:, None, None, :]
        kb = pad_sequence(keys, batch_first=True).transpose(1, 2)  # [B, H_kv, S_max, Dh]
        vb = pad_sequence(values, batch_first=True).transpose(1, 2)
        if a.n_kv_heads != a.n_heads:
            kb = kb.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
            vb = vb.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        return F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask)  # [B, H, 1, Dh]

    def _mlp(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, blk.w13, blk.b13).chunk(2, dim=-1)
        return linear(self._act(gate) * up, blk.w2, blk.b2)
