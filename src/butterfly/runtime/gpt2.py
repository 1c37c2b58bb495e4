"""GPT-2 decoder (Hugging Face `gpt2` checkpoints).

Mirrors `llama.py`: plain tensors and one forward pass read top to bottom. GPT-2 stores
its projections as `Conv1D` weights of shape [in, out]; they are transposed once at load
so every product is an ordinary `linear` (runtime/linear.py). The output head is tied to the token
embedding, so a last stage that is not also the first reads `wte` a second time: the
pipeline then holds two copies, which is the price of not shipping weights between nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.linear import Weight, linear, prepare
from butterfly.runtime.precision import Precision
from butterfly.runtime.stage import Family, causal_mask, check_positions, check_token_ids
from butterfly.runtime.weights import CheckpointReader, config_count
from butterfly.types.errors import InvalidInput, UnknownArchitecture
from butterfly.types.model import DecoderBlock, LayerInfo, LayerRange

MODEL_TYPES = ("gpt2",)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class GPT2Args:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    inner: int  # MLP hidden size
    activation: str
    norm_eps: float
    max_context: int  # learned positions: there is no embedding beyond n_positions
    scale_attn: bool  # divide scores by sqrt(head_dim)
    scale_by_layer: bool  # further divide layer i's scores by i + 1 (some fine-tunes)
    tie_embeddings: bool
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> GPT2Args:
        try:
            dim, n_heads = config_count(cfg, "n_embd"), config_count(cfg, "n_head")
            activation = str(cfg.get("activation_function", "gelu_new"))
            args = cls(
                vocab_size=config_count(cfg, "vocab_size"),
                dim=dim,
                n_layers=config_count(cfg, "n_layer"),
                n_heads=n_heads,
                inner=config_count(cfg, "n_inner", 4 * dim),
                activation=activation,
                norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                max_context=config_count(cfg, "n_positions", config_count(cfg, "n_ctx", 1024)),
                scale_attn=bool(cfg.get("scale_attn_weights", True)),
                scale_by_layer=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            )
        except KeyError as e:
            raise UnknownArchitecture(f"gpt2 config lacks required field {e}") from e
        except (ValueError, TypeError) as e:  # "layer_norm_epsilon": "small"
            raise UnknownArchitecture(f"gpt2 config has a value of the wrong kind: {e}") from e
        if activation not in ACTIVATIONS:
            raise UnknownArchitecture(
                f"gpt2 activation_function {activation!r} is not supported "
                f"({', '.join(sorted(ACTIVATIONS))})"
            )
        if dim % n_heads:
            raise UnknownArchitecture(f"gpt2 n_embd {dim} is not divisible by n_head {n_heads}")
        return args


@dataclass
class Block:
    ln1_w: torch.Tensor  # [D]
    ln1_b: torch.Tensor
    wqkv: Weight  # [3 D, D], transposed from Conv1D's [D, 3 D]
    bqkv: torch.Tensor  # [3 D]
    wo: Weight  # [D, D]
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w_fc: Weight  # [I, D]
    b_fc: torch.Tensor
    w_proj: Weight  # [D, I]
    b_proj: torch.Tensor
    scale: float  # attention score scale of this layer


class GPT2Stage:
    input_kind = "tokens"

    def __init__(
        self,
        args: GPT2Args,
        layers: LayerRange,
        blocks: list[Block],
        embed: tuple[torch.Tensor, torch.Tensor] | None,  # wte, wpe
        final: tuple[torch.Tensor, torch.Tensor, Weight] | None,  # ln_f w, b, head
    ) -> None:
        self.args, self.layers, self.blocks = args, layers, blocks
        self.embed, self.final = embed, final
        self.num_layers, self.max_context = args.n_layers, args.max_context
        self._act = ACTIVATIONS[args.activation]

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.num_layers

    def new_cache(self, batch: int = 1) -> KVCache:
        a = self.args
        return KVCache(len(self.blocks), batch, a.n_heads, a.head_dim, a.max_context, a.dtype)

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
            raise InvalidInput("a GPT-2 stage needs its KV cache (stage.new_cache())")
        a = self.args
        if self.embed is not None and x.ndim != 2:
            raise InvalidInput(f"token ids must have shape [batch, tokens], got {tuple(x.shape)}")
        if self.embed is None and (x.ndim != 3 or x.shape[-1] != a.dim):
            raise InvalidInput(f"hidden states must be [B, T, {a.dim}], got {tuple(x.shape)}")
        length = x.shape[1]
        check_positions(start_pos, length, self.max_context)  # before wpe is indexed
        if self.embed is not None:
            check_token_ids(x, a.vocab_size)
            wte, wpe = self.embed
            h = F.embedding(x, wte) + wpe[start_pos : start_pos + length]
        else:
            h = x.to(a.dtype)
        mask = causal_mask(start_pos, length)
        for i, blk in enumerate(self.blocks):
            y = F.layer_norm(h, (a.dim,), blk.ln1_w, blk.ln1_b, a.norm_eps)
            h = h + self._attention(blk, y, cache, i, start_pos, mask)
            y = F.layer_norm(h, (a.dim,), blk.ln2_w, blk.ln2_b, a.norm_eps)
            h = h + linear(self._act(linear(y, blk.w_fc, blk.b_fc)), blk.w_proj, blk.b_proj)
            if trace is not None:  # per-layer outputs, for the Merkle root of a proof
                trace.append(h)
        cache.advance(start_pos + length)
        if self.final is None:
            return h
        if last_only:
            h = h[:, -1:]
        norm_w, norm_b, head = self.final
        return linear(F.layer_norm(h, (a.dim,), norm_w, norm_b, a.norm_eps), head)

    def _attention(
        self,
        blk: Block,
        x: torch.Tensor,
        cache: KVCache,
        layer: int,
        start_pos: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        a = self.args
        bsz, length, _ = x.shape
        q, k, v = linear(x, blk.wqkv, blk.bqkv).chunk(3, dim=-1)
        q = q.view(bsz, length, a.n_heads, a.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(bsz, length, a.n_heads, a.head_dim).transpose(1, 2)
        v = v.view(bsz, length, a.n_heads, a.head_dim).transpose(1, 2)
        k, v = cache.update(layer, start_pos, k, v)  # [B, H, start + T, Dh]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and length > 1, scale=blk.scale
        )
        return linear(out.transpose(1, 2).reshape(bsz, length, a.dim), blk.wo, blk.bo)


def tensor_prefix(reader: CheckpointReader) -> str:
    """`transformer.` for GPT2LMHeadModel checkpoints, empty for bare GPT2Model ones."""
    return "transformer." if reader.has("transformer.wte.weight") else ""


def load_stage(reader: CheckpointReader, args: GPT2Args, layers: LayerRange) -> GPT2Stage:
    layers.check_within(args.n_layers)
    d, inner, p = args.dim, args.inner, tensor_prefix(reader)
    first, last = layers.start == 0, layers.end == args.n_layers
    wte = f"{p}wte.weight"
    head = wte if args.tie_embeddings else "lm_head.weight"
    shapes = {
        "ln_1.weight": (d,), "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,), "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (inner, d), "mlp.c_proj.bias": (d,),
    }  # fmt: skip
    wanted: list[tuple[str, tuple[int, ...] | None]] = [
        (f"{p}h.{n}.{name}", shape) for n in layers for name, shape in shapes.items()
    ]
    if first:
        wanted += [(wte, (args.vocab_size, d)), (f"{p}wpe.weight", (args.max_context, d))]
    if last:
        wanted += [(f"{p}ln_f.weight", (d,)), (f"{p}ln_f.bias", (d,))]
        if head != wte or not first:
            wanted.append((head, (args.vocab_size, d)))
    w = reader.read_many(wanted)
    dense = Precision(args.dtype)  # no int8 for this family: the loader refuses it

    blocks = []
    for i, n in enumerate(layers):
        reader.progress("pack", i, len(layers))
        t = {name: w.pop(f"{p}h.{n}.{name}") for name in shapes}

        def mat(
            name: str, t: dict[str, torch.Tensor] = t
        ) -> Weight:  # Conv1D [in, out] -> [out, in] on its kernel
            return prepare(t[name].t().contiguous(), dense)

        scale = args.head_dim**-0.5 if args.scale_attn else 1.0
        blocks.append(
            Block(
                ln1_w=t["ln_1.weight"], ln1_b=t["ln_1.bias"],
                wqkv=mat("attn.c_attn.weight"), bqkv=t["attn.c_attn.bias"],
                wo=mat("attn.c_proj.weight"), bo=t["attn.c_proj.bias"],
                ln2_w=t["ln_2.weight"], ln2_b=t["ln_2.bias"],
                w_fc=mat("mlp.c_fc.weight"), b_fc=t["mlp.c_fc.bias"],
                w_proj=mat("mlp.c_proj.weight"), b_proj=t["mlp.c_proj.bias"],
                scale=scale / (n + 1) if args.scale_by_layer else scale,
            )
        )  # fmt: skip
    embed = (w[wte], w[f"{p}wpe.weight"]) if first else None
    final = None
    if last:  # a tied head that is also this stage's embedding stays one tensor
        head_w = prepare(w[head], dense) if head != wte or not first else w[head]
        final = (w[f"{p}ln_f.weight"], w[f"{p}ln_f.bias"], head_w)
    return GPT2Stage(args, layers, blocks, embed, final)


def layer_infos(args: GPT2Args) -> list[LayerInfo]:
    """Per-layer costs; FLOPs count the matrix products of one token at short context."""
    d, esize = args.dim, torch.empty((), dtype=args.dtype).element_size()
    attn = 4 * d * d  # fused qkv and output projection
    mlp = 2 * d * args.inner
    block_params = attn + 4 * d + mlp + args.inner + d + 4 * d  # + biases and two norms
    embed_params = (args.vocab_size + args.max_context) * d
    head_params = args.vocab_size * d + 2 * d
    kind = DecoderBlock(d, args.n_heads, args.n_heads, args.inner)
    infos = []
    for n in range(args.n_layers):
        flops = 2.0 * (attn + mlp)
        params = block_params
        if n == 0:
            params += embed_params
        if n == args.n_layers - 1:
            flops += 2.0 * args.vocab_size * d
            shared = args.vocab_size * d if args.tie_embeddings and n == 0 else 0
            params += head_params - shared
        infos.append(
            LayerInfo(
                id=n,
                layer_type=kind,
                compute_cost=flops,
                memory_bytes=params * esize,
                output_size=d,
                kv_bytes_per_token=2 * d * esize,
                activation_bytes_per_token=d * esize,
            )
        )
    return infos


FAMILY = Family(
    name="gpt2",
    parse=GPT2Args.from_config,
    num_layers=lambda a: a.n_layers,
    layer_infos=layer_infos,
    load_stage=load_stage,
)
