"""BERT-style encoder (Hugging Face `bert` checkpoints, e.g. all-MiniLM-L6-v2).

Every position attends to every other, so there is nothing to cache between calls and the
whole sequence goes through in one forward pass. One unpadded sequence per row is
supported: there is no attention mask, so a batch must hold sequences of equal length
and padding tokens would be attended to. The last stage returns the final hidden states,
since an encoder has no LM head; pooling is the caller's choice (mean, CLS, ...).
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
from butterfly.runtime.stage import Family, check_positions, check_token_ids
from butterfly.runtime.weights import CheckpointReader, config_count
from butterfly.types.errors import InvalidInput, UnknownArchitecture
from butterfly.types.model import EncoderBlock, LayerInfo, LayerRange

MODEL_TYPES = ("bert",)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    intermediate: int
    activation: str
    norm_eps: float
    max_context: int
    type_vocab_size: int
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> BertArgs:
        try:
            args = cls(
                vocab_size=config_count(cfg, "vocab_size"),
                dim=config_count(cfg, "hidden_size"),
                n_layers=config_count(cfg, "num_hidden_layers"),
                n_heads=config_count(cfg, "num_attention_heads"),
                intermediate=config_count(cfg, "intermediate_size"),
                activation=str(cfg.get("hidden_act", "gelu")),
                norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                max_context=config_count(cfg, "max_position_embeddings", 512),
                type_vocab_size=config_count(cfg, "type_vocab_size", 2),
            )
        except KeyError as e:
            raise UnknownArchitecture(f"bert config lacks required field {e}") from e
        except (ValueError, TypeError) as e:  # "layer_norm_eps": "small"
            raise UnknownArchitecture(f"bert config has a value of the wrong kind: {e}") from e
        if args.activation not in ACTIVATIONS:
            raise UnknownArchitecture(
                f"bert hidden_act {args.activation!r} is not supported "
                f"({', '.join(sorted(ACTIVATIONS))})"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute" or cfg.get("is_decoder"):
            raise UnknownArchitecture(
                "only bidirectional bert encoders with absolute position embeddings are supported"
            )
        if args.dim % args.n_heads:
            raise UnknownArchitecture(
                f"bert hidden_size {args.dim} is not divisible by {args.n_heads} attention heads"
            )
        return args


@dataclass
class Block:
    wqkv: Weight  # [3 D, D]: query, key, value stacked
    bqkv: torch.Tensor
    wo: Weight  # [D, D]
    bo: torch.Tensor
    ln1_w: torch.Tensor  # post-attention LayerNorm
    ln1_b: torch.Tensor
    w_in: Weight  # [I, D]
    b_in: torch.Tensor
    w_out: Weight  # [D, I]
    b_out: torch.Tensor
    ln2_w: torch.Tensor  # post-MLP LayerNorm
    ln2_b: torch.Tensor


@dataclass
class Embeddings:
    word: torch.Tensor  # [V, D]
    position: torch.Tensor  # [P, D]
    token_type: torch.Tensor  # [D]: row 0, since every token is of segment A
    norm_w: torch.Tensor
    norm_b: torch.Tensor


class BertStage:
    input_kind = "tokens"

    def __init__(
        self, args: BertArgs, layers: LayerRange, blocks: list[Block], embed: Embeddings | None
    ) -> None:
        self.args, self.layers, self.blocks, self.embed = args, layers, blocks, embed
        self.num_layers, self.max_context = args.n_layers, args.max_context
        self._act = ACTIVATIONS[args.activation]

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.num_layers

    def new_cache(self, batch: int = 1) -> KVCache | None:
        return None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        start_pos: int,
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`cache` is ignored. `start_pos` must be 0: without a cache a later chunk could not
        attend to an earlier one, so chunked input would silently change the result."""
        a = self.args
        if start_pos != 0:
            raise InvalidInput(
                f"an encoder takes the whole sequence at once (start_pos {start_pos})"
            )
        if self.embed is not None and x.ndim != 2:
            raise InvalidInput(f"token ids must have shape [batch, tokens], got {tuple(x.shape)}")
        if self.embed is None and (x.ndim != 3 or x.shape[-1] != a.dim):
            raise InvalidInput(f"hidden states must be [B, T, {a.dim}], got {tuple(x.shape)}")
        length = x.shape[1]
        check_positions(0, length, self.max_context)
        if self.embed is not None:
            check_token_ids(x, a.vocab_size)
            e = self.embed
            h = F.embedding(x, e.word) + e.token_type + e.position[:length]
            h = F.layer_norm(h, (a.dim,), e.norm_w, e.norm_b, a.norm_eps)
        else:
            h = x.to(a.dtype)
        for blk in self.blocks:
            h = F.layer_norm(
                h + self._attention(blk, h), (a.dim,), blk.ln1_w, blk.ln1_b, a.norm_eps
            )
            y = linear(self._act(linear(h, blk.w_in, blk.b_in)), blk.w_out, blk.b_out)
            h = F.layer_norm(h + y, (a.dim,), blk.ln2_w, blk.ln2_b, a.norm_eps)
            if trace is not None:  # per-layer outputs, for the Merkle root of a proof
                trace.append(h)
        return h[:, -1:] if last_only and self.is_last else h

    def _attention(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        bsz, length, _ = x.shape
        qkv = linear(x, blk.wqkv, blk.bqkv).view(bsz, length, 3, a.n_heads, a.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, Dh]
        out = F.scaled_dot_product_attention(q, k, v)
        return linear(out.transpose(1, 2).reshape(bsz, length, a.dim), blk.wo, blk.bo)


def tensor_prefix(reader: CheckpointReader) -> str:
    """`bert.` for task-head checkpoints (BertForMaskedLM, ...), empty for bare BertModel."""
    return "bert." if reader.has("bert.embeddings.word_embeddings.weight") else ""


TF_NORM_NAMES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))
"""BERT checkpoints converted from TensorFlow (bert-base-uncased's published weights)
name a LayerNorm's parameters `gamma` and `beta`; transformers renames them on load."""


def stored_name(reader: CheckpointReader, name: str) -> str:
    """The name `name` has in this checkpoint: itself, or its TensorFlow-era spelling
    (`TF_NORM_NAMES`) when only that is there."""
    for current, tf_name in TF_NORM_NAMES:
        if name.endswith(current) and not reader.has(name):
            legacy = name.removesuffix(current) + tf_name
            if reader.has(legacy):
                return legacy
    return name


def load_stage(reader: CheckpointReader, args: BertArgs, layers: LayerRange) -> BertStage:
    layers.check_within(args.n_layers)
    d, inner, p = args.dim, args.intermediate, tensor_prefix(reader)
    shapes = {
        "attention.self.query.weight": (d, d), "attention.self.query.bias": (d,),
        "attention.self.key.weight": (d, d), "attention.self.key.bias": (d,),
        "attention.self.value.weight": (d, d), "attention.self.value.bias": (d,),
        "attention.output.dense.weight": (d, d), "attention.output.dense.bias": (d,),
        "attention.output.LayerNorm.weight": (d,), "attention.output.LayerNorm.bias": (d,),
        "intermediate.dense.weight": (inner, d), "intermediate.dense.bias": (inner,),
        "output.dense.weight": (d, inner), "output.dense.bias": (d,),
        "output.LayerNorm.weight": (d,), "output.LayerNorm.bias": (d,),
    }  # fmt: skip
    wanted: list[tuple[str, tuple[int, ...] | None]] = [
        (f"{p}encoder.layer.{n}.{name}", shape) for n in layers for name, shape in shapes.items()
    ]
    e = f"{p}embeddings"
    if layers.start == 0:
        wanted += [
            (f"{e}.word_embeddings.weight", (args.vocab_size, d)),
            (f"{e}.position_embeddings.weight", (args.max_context, d)),
            (f"{e}.token_type_embeddings.weight", (args.type_vocab_size, d)),
            (f"{e}.LayerNorm.weight", (d,)),
            (f"{e}.LayerNorm.bias", (d,)),
        ]
    stored = {name: stored_name(reader, name) for name, _ in wanted}
    read = reader.read_many((stored[name], shape) for name, shape in wanted)
    w = {name: read[stored[name]] for name, _ in wanted}
    dense = Precision(args.dtype)  # no int8 for this family: the loader refuses it

    blocks = []
    for i, n in enumerate(layers):
        reader.progress("pack", i, len(layers))
        t = {name: w.pop(f"{p}encoder.layer.{n}.{name}") for name in shapes}
        qkv = [f"attention.self.{x}" for x in ("query", "key", "value")]

        def mat(name: str, t: dict[str, torch.Tensor] = t) -> Weight:
            return prepare(t[name], dense)

        blocks.append(
            Block(
                wqkv=prepare(torch.cat([t[f"{x}.weight"] for x in qkv]), dense),
                bqkv=torch.cat([t[f"{x}.bias"] for x in qkv]),
                wo=mat("attention.output.dense.weight"), bo=t["attention.output.dense.bias"],
                ln1_w=t["attention.output.LayerNorm.weight"],
                ln1_b=t["attention.output.LayerNorm.bias"],
                w_in=mat("intermediate.dense.weight"), b_in=t["intermediate.dense.bias"],
                w_out=mat("output.dense.weight"), b_out=t["output.dense.bias"],
                ln2_w=t["output.LayerNorm.weight"], ln2_b=t["output.LayerNorm.bias"],
            )
        )  # fmt: skip
    embed = None
    if layers.start == 0:
        embed = Embeddings(
            word=w[f"{e}.word_embeddings.weight"],
            position=w[f"{e}.position_embeddings.weight"],
            token_type=w[f"{e}.token_type_embeddings.weight"][0].clone(),
            norm_w=w[f"{e}.LayerNorm.weight"],
            norm_b=w[f"{e}.LayerNorm.bias"],
        )
    return BertStage(args, layers, blocks, embed)


def layer_infos(args: BertArgs) -> list[LayerInfo]:
    """Per-layer costs; FLOPs count the matrix products of one token at short context."""
    d, esize = args.dim, torch.empty((), dtype=args.dtype).element_size()
    attn = 4 * d * d
    mlp = 2 * d * args.intermediate
    block_params = attn + 4 * d + mlp + args.intermediate + d + 4 * d  # + biases and two norms
    embed_params = (args.vocab_size + args.max_context + args.type_vocab_size) * d + 2 * d
    kind = EncoderBlock(d, args.n_heads, args.intermediate)
    return [
        LayerInfo(
            id=n,
            layer_type=kind,
            compute_cost=2.0 * (attn + mlp),
            memory_bytes=(block_params + (embed_params if n == 0 else 0)) * esize,
            output_size=d,
            activation_bytes_per_token=d * esize,
        )
        for n in range(args.n_layers)
    ]


FAMILY = Family(
    name="bert",
    parse=BertArgs.from_config,
    num_layers=lambda a: a.n_layers,
    layer_infos=layer_infos,
    load_stage=load_stage,
    generates=False,
)
