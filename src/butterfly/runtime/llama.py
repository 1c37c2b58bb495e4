"""Llama-architecture decoder (also Mistral- and Qwen2-style checkpoints).

Weights are plain tensors (the large ones packed for oneDNN, runtime/linear.py) and the
forward pass is a few functions, as in gpt-fast's `model.py`: a reader sees every
operation of a stage top to bottom. q/k/v and gate/up projections are fused into one
matrix each, since a decode step is a handful of matrix-vector products and every call
costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.linear import linear, pack
from butterfly.runtime.stage import Family, causal_mask, check_positions, check_token_ids
from butterfly.runtime.weights import CheckpointReader
from butterfly.types.errors import UnknownArchitecture
from butterfly.types.model import DecoderBlock, LayerInfo, LayerRange

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads for grouped-query attention
    head_dim: int
    intermediate: int  # MLP hidden size
    norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]  # the config's rope_scaling, as sorted items
    max_context: int
    tie_embeddings: bool
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaArgs:
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(cfg.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0)
            rope.pop("rope_theta", None)
            kind = rope.pop("rope_type", rope.pop("type", "default"))
            scaling = () if kind == "default" else (("rope_type", kind), *sorted(rope.items()))
            max_context = int(cfg.get("max_position_embeddings", 2048))
            window = cfg.get("sliding_window")
            if cfg.get("use_sliding_window", window is not None) and window:
                max_context = min(max_context, int(window))  # beyond it Mistral masks; we refuse
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                dim=dim,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                intermediate=int(cfg["intermediate_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_context=max_context,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise UnknownArchitecture(f"llama config lacks required field {e}") from e


@dataclass
class Block:
    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2 H_kv) * Dh, D]
    bqkv: torch.Tensor | None  # Qwen2 and attention_bias checkpoints
    wo: torch.Tensor  # [D, H * Dh]
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor
    w13: torch.Tensor  # gate and up stacked: [2 * I, D]
    w2: torch.Tensor  # down: [D, I]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_frequencies(args: LlamaArgs) -> torch.Tensor:
    dh = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    scaling = dict(args.rope_scaling)
    kind = scaling.get("rope_type")
    if kind is None:
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnknownArchitecture(
        f"rope scaling type {kind!r} is not supported (default, linear, llama3)"
    )


class LlamaStage:
    input_kind = "tokens"

    def __init__(
        self,
        args: LlamaArgs,
        layers: LayerRange,
        blocks: list[Block],
        embed: torch.Tensor | None,
        norm: torch.Tensor | None,
        head: torch.Tensor | None,
    ) -> None:
        self.args, self.layers, self.blocks = args, layers, blocks
        self.embed, self.norm, self.head = embed, norm, head
        self.num_layers, self.max_context = args.n_layers, args.max_context
        self._inv_freq = inv_frequencies(args)
        self._cos = self._sin = torch.empty(0, args.head_dim)

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
        end = start + length
        if end > self._cos.shape[0]:
            n = min(self.max_context, max(end, 2 * self._cos.shape[0], 256))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos().to(self.args.dtype), emb.sin().to(self.args.dtype)
        return self._cos[start:end], self._sin[start:end]

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, start_pos: int, *, last_only: bool = False
    ) -> torch.Tensor:
        if cache is None:
            raise ValueError("a decoder stage needs its KV cache (stage.new_cache())")
        return self.forward_rows(x, [cache], [start_pos], last_only=last_only)

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
        if self.embed is not None:
            check_token_ids(x, self.args.vocab_size)
            h = F.embedding(x, self.embed)  # [B, T, D]
        else:
            h = x.to(self.args.dtype)
        length = h.shape[1]
        for start in starts:
            check_positions(start, length, self.max_context)
        rope = [self._rope(start, length) for start in starts]  # each [T, Dh]
        cos = torch.stack([c for c, _ in rope]).unsqueeze(1)  # [B, 1, T, Dh]
        sin = torch.stack([s for _, s in rope]).unsqueeze(1)
        masks = [causal_mask(start, length) for start in starts]
        eps = self.args.norm_eps
        for i, blk in enumerate(self.blocks):
            a = rms_norm(h, blk.attn_norm, eps)
            h = h + self._attention(blk, a, caches, i, starts, cos, sin, masks)
            h = h + self._mlp(blk, rms_norm(h, blk.mlp_norm, eps))
            if trace is not None:  # per-layer outputs, for the Merkle root of a proof
                trace.append(h)
        for cache, start in zip(caches, starts, strict=True):
            cache.advance(start + length)
        if self.head is None:
            return h
        if last_only:
            h = h[:, -1:]
        return linear(rms_norm(h, self.norm, eps), self.head)  # type: ignore[arg-type]

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
        q = q.view(bsz, length, a.n_heads, a.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(bsz, length, a.n_kv_heads, a.head_dim).transpose(1, 2)
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
        gate, up = linear(x, blk.w13).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, blk.w2)


def load_stage(reader: CheckpointReader, args: LlamaArgs, layers: LayerRange) -> LlamaStage:
    layers.check_within(args.n_layers)
    d, dh, i_size = args.dim, args.head_dim, args.intermediate
    q_out, kv_out = args.n_heads * dh, args.n_kv_heads * dh
    first, last = layers.start == 0, layers.end == args.n_layers
    embed_name = "model.embed_tokens.weight"
    head_name = embed_name if args.tie_embeddings else "lm_head.weight"

    def attn_bias(p: str, name: str, size: int) -> list[tuple[str, tuple[int, ...] | None]]:
        full = f"{p}.self_attn.{name}.bias"
        return [(full, (size,))] if reader.has(full) else []

    wanted: list[tuple[str, tuple[int, ...] | None]] = []
    for n in layers:
        p = f"model.layers.{n}"
        wanted += [
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.self_attn.q_proj.weight", (q_out, d)),
            (f"{p}.self_attn.k_proj.weight", (kv_out, d)),
            (f"{p}.self_attn.v_proj.weight", (kv_out, d)),
            (f"{p}.self_attn.o_proj.weight", (d, q_out)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.mlp.gate_proj.weight", (i_size, d)),
            (f"{p}.mlp.up_proj.weight", (i_size, d)),
            (f"{p}.mlp.down_proj.weight", (d, i_size)),
        ]
        wanted += attn_bias(p, "q_proj", q_out) + attn_bias(p, "k_proj", kv_out)
        wanted += attn_bias(p, "v_proj", kv_out) + attn_bias(p, "o_proj", d)
    if first:
        wanted.append((embed_name, (args.vocab_size, d)))
    if last:
        wanted.append(("model.norm.weight", (d,)))
        if head_name != embed_name or not first:
            wanted.append((head_name, (args.vocab_size, d)))
    w = reader.read_many(wanted)

    blocks = []
    for i, n in enumerate(layers):
        reader.progress("pack", i, len(layers))
        p = f"model.layers.{n}.self_attn"
        biases = [w.get(f"{p}.{x}_proj.bias") for x in "qkv"]
        blocks.append(
            Block(
                attn_norm=w.pop(f"model.layers.{n}.input_layernorm.weight"),
                wqkv=pack(torch.cat([w.pop(f"{p}.{x}_proj.weight") for x in "qkv"])),
                bqkv=torch.cat([b for b in biases if b is not None])
                if all(b is not None for b in biases)
                else None,
                wo=pack(w.pop(f"{p}.o_proj.weight")),
                bo=w.get(f"{p}.o_proj.bias"),
                mlp_norm=w.pop(f"model.layers.{n}.post_attention_layernorm.weight"),
                w13=pack(
                    torch.cat(
                        [
                            w.pop(f"model.layers.{n}.mlp.gate_proj.weight"),
                            w.pop(f"model.layers.{n}.mlp.up_proj.weight"),
                        ]
                    )
                ),
                w2=pack(w.pop(f"model.layers.{n}.mlp.down_proj.weight")),
            )
        )
    embed = w.get(embed_name) if first else None
    head = w.get(head_name) if last else None
    if head is not None and head is not embed:  # a tied head stays the embedding's tensor
        head = pack(head)
    return LlamaStage(args, layers, blocks, embed, w.get("model.norm.weight"), head)


def layer_infos(args: LlamaArgs) -> list[LayerInfo]:
    """Per-layer costs; FLOPs count the matrix products of one token at short context."""
    d, dh, esize = args.dim, args.head_dim, torch.empty((), dtype=args.dtype).element_size()
    attn = d * (args.n_heads + 2 * args.n_kv_heads) * dh + args.n_heads * dh * d
    mlp = 3 * d * args.intermediate
    block_params = attn + mlp + 2 * d
    embed_params = args.vocab_size * d
    head_params = args.vocab_size * d + d
    kind = DecoderBlock(d, args.n_heads, args.n_kv_heads, args.intermediate)
    infos = []
    for n in range(args.n_layers):
        flops = 2.0 * (attn + mlp)
        params = block_params
        if n == 0:
            params += embed_params
        if n == args.n_layers - 1:
            flops += 2.0 * args.vocab_size * d
            params += head_params - (embed_params if args.tie_embeddings and n == 0 else 0)
        infos.append(
            LayerInfo(
                id=n,
                layer_type=kind,
                compute_cost=flops,
                memory_bytes=params * esize,
                output_size=d,
                kv_bytes_per_token=2 * args.n_kv_heads * dh * esize,
                activation_bytes_per_token=d * esize,
            )
        )
    return infos


FAMILY = Family(
    name="llama",
    parse=LlamaArgs.from_config,
    num_layers=lambda a: a.n_layers,
    layer_infos=layer_infos,
    load_stage=load_stage,
)
