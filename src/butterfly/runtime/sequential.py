"""The specification's generic sequential stack over input vectors.

A model is a JSON list of layers (linear, activation, transformer_block), each one layer
for staging, so the partitioner can cut between any two. A transformer_block holds
exactly the parameters of `torch.nn.TransformerEncoderLayer(batch_first=True,
norm_first=True)` under its default ReLU and LayerNorm eps, so an unsplit reference is a
plain `nn.Sequential` loaded with `strict=True`: the checkpoint format needs no converter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.stage import Family, check_positions
from butterfly.runtime.weights import CheckpointReader
from butterfly.types.errors import InvalidInput, UnknownArchitecture
from butterfly.types.model import Activation, LayerInfo, LayerRange, Linear, TransformerBlock

MODEL_TYPE = "butterfly_sequential"
NORM_EPS = 1e-5  # nn.TransformerEncoderLayer's default

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

SeqLayer = Linear | Activation | TransformerBlock


def _positive(spec: dict[str, Any], key: str, where: str) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnknownArchitecture(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def parse_layer(spec: Any, index: int, dim: int) -> tuple[SeqLayer, int]:
    """One JSON layer and the features it produces, checked against the `dim` it receives,
    so a bad spec fails at load naming the layer instead of deep inside a forward pass."""
    where = f"sequential layer {index}"
    if not isinstance(spec, dict):
        raise UnknownArchitecture(f"{where} must be a JSON object, got {spec!r}")
    kind = spec.get("type")
    layer: SeqLayer
    if kind == "linear":
        need, out = _positive(spec, "input_dim", where), _positive(spec, "output_dim", where)
        layer = Linear(need, out)
    elif kind == "activation":
        layer, need, out = Activation(str(spec.get("kind"))), dim, dim
        if layer.kind not in ACTIVATIONS:
            raise UnknownArchitecture(
                f"{where}: activation kind {layer.kind!r} is not one of {', '.join(ACTIVATIONS)}"
            )
    elif kind == "transformer_block":
        need = out = _positive(spec, "hidden_dim", where)
        heads = _positive(spec, "num_heads", where)
        layer = TransformerBlock(need, heads, _positive(spec, "ff_dim", where))
        if need % heads:
            raise UnknownArchitecture(
                f"{where}: hidden_dim {need} is not divisible by {heads} heads"
            )
    else:
        raise UnknownArchitecture(
            f"{where}: unknown layer type {kind!r} (linear, activation, transformer_block)"
        )
    if need != dim:
        source = f"layer {index - 1}" if index else "the model's input_dim"
        raise UnknownArchitecture(f"{where} ({kind}) takes {need} features, {source} gives {dim}")
    return layer, out


@dataclass(frozen=True)
class SequentialArgs:
    input_dim: int
    layers: tuple[SeqLayer, ...]
    dims: tuple[int, ...]  # features entering each layer, then the model's output size
    max_context: int  # longest input sequence; attention cost grows with its square
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SequentialArgs:
        dim = _positive(cfg, "input_dim", "sequential config")
        specs = cfg.get("layers")
        if not isinstance(specs, list) or not specs:
            raise UnknownArchitecture("sequential config needs a non-empty 'layers' list")
        layers, dims = [], [dim]
        for i, spec in enumerate(specs):
            layer, out = parse_layer(spec, i, dims[-1])
            layers.append(layer)
            dims.append(out)
        context = _positive({"max_context": 4096, **cfg}, "max_context", "sequential config")
        return cls(dim, tuple(layers), tuple(dims), context)


@dataclass
class LinearWeights:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor


@dataclass
class Block:
    """A transformer_block's tensors, in the order `tensor_shapes` lists them."""

    heads: int
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    wqkv: torch.Tensor  # in_proj_weight [3 D, D]
    bqkv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    w1: torch.Tensor  # [F, D]
    b1: torch.Tensor
    w2: torch.Tensor  # [D, F]
    b2: torch.Tensor


def block_forward(blk: Block, h: torch.Tensor) -> torch.Tensor:
    """Pre-norm, bidirectional: what `TransformerEncoderLayer(norm_first=True)` computes."""
    bsz, length, d = h.shape
    y = F.layer_norm(h, (d,), blk.norm1_w, blk.norm1_b, NORM_EPS)
    qkv = F.linear(y, blk.wqkv, blk.bqkv).view(bsz, length, 3, blk.heads, d // blk.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, Dh]
    att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bsz, length, d)
    h = h + F.linear(att, blk.wo, blk.bo)
    y = F.layer_norm(h, (d,), blk.norm2_w, blk.norm2_b, NORM_EPS)
    return h + F.linear(F.relu(F.linear(y, blk.w1, blk.b1)), blk.w2, blk.b2)


class SequentialStage:
    input_kind = "vectors"

    def __init__(
        self, args: SequentialArgs, layers: LayerRange, ops: list[LinearWeights | str | Block]
    ) -> None:
        self.args, self.layers, self.ops = args, layers, ops
        self.num_layers, self.max_context = len(args.layers), args.max_context

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
        """`x` is [B, S, D], or one vector [D] on the first stage; `cache` is ignored. Rows
        attend to each other, so the whole sequence comes at once (`start_pos` 0)."""
        if start_pos != 0:
            raise InvalidInput(
                f"a sequential stage takes the whole input at once (start_pos {start_pos})"
            )
        want = self.args.dims[self.layers.start]
        if self.is_first and x.ndim == 1:
            x = x.view(1, 1, -1)
        if x.ndim != 3 or x.shape[-1] != want:
            what = "input vector" if self.is_first else "hidden state [B, S, D]"
            raise InvalidInput(
                f"{what} must have {want} features for layers {self.layers}, "
                f"got shape {tuple(x.shape)}"
            )
        check_positions(0, x.shape[1], self.max_context)
        h = x.to(self.args.dtype)
        for op in self.ops:
            if isinstance(op, LinearWeights):
                h = F.linear(h, op.weight, op.bias)
            elif isinstance(op, Block):
                h = block_forward(op, h)
            else:
                h = ACTIVATIONS[op](h)
            if trace is not None:  # per-layer outputs, for the Merkle root of a proof
                trace.append(h)
        return h[:, -1:] if last_only and self.is_last else h


def tensor_shapes(layer: SeqLayer, index: int) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of one layer and their shapes, in `Block`'s field order."""
    p = f"layers.{index}."
    if isinstance(layer, Linear):
        return {p + "weight": (layer.output_dim, layer.input_dim), p + "bias": (layer.output_dim,)}
    if isinstance(layer, Activation):
        return {}
    d, f = layer.hidden_dim, layer.ff_dim
    shapes = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "self_attn.in_proj_weight": (3 * d, d), "self_attn.in_proj_bias": (3 * d,),
        "self_attn.out_proj.weight": (d, d), "self_attn.out_proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "linear1.weight": (f, d), "linear1.bias": (f,),
        "linear2.weight": (d, f), "linear2.bias": (d,),
    }  # fmt: skip
    return {p + name: shape for name, shape in shapes.items()}


def load_stage(
    reader: CheckpointReader, args: SequentialArgs, layers: LayerRange
) -> SequentialStage:
    layers.check_within(len(args.layers))
    w = reader.read_many(item for n in layers for item in tensor_shapes(args.layers[n], n).items())
    ops: list[LinearWeights | str | Block] = []
    for n in layers:
        layer, p = args.layers[n], f"layers.{n}."
        if isinstance(layer, Linear):
            ops.append(LinearWeights(w[p + "weight"], w[p + "bias"]))
        elif isinstance(layer, Activation):
            ops.append(layer.kind)
        else:
            ops.append(Block(layer.num_heads, *(w[name] for name in tensor_shapes(layer, n))))
    return SequentialStage(args, layers, ops)


def layer_infos(args: SequentialArgs) -> list[LayerInfo]:
    """Per-layer costs of one input row; FLOPs count matrix products (elementwise: 1)."""
    esize = torch.empty((), dtype=args.dtype).element_size()
    infos = []
    for n, layer in enumerate(args.layers):
        params = sum(math.prod(s) for s in tensor_shapes(layer, n).values())
        if isinstance(layer, Linear):
            flops = 2.0 * layer.input_dim * layer.output_dim
        elif isinstance(layer, Activation):
            flops = float(args.dims[n])
        else:
            d = layer.hidden_dim
            flops = 2.0 * (4 * d * d + 2 * d * layer.ff_dim)
        out = args.dims[n + 1]
        infos.append(
            LayerInfo(
                id=n,
                layer_type=layer,
                compute_cost=flops,
                memory_bytes=params * esize,
                output_size=out,
                activation_bytes_per_token=out * esize,
            )
        )
    return infos


def create_sequential(
    out_dir: Path, layers_spec: list[dict[str, Any]], input_dim: int, seed: int
) -> Path:
    """Write a seeded model: the same spec and seed give the same bytes on every machine."""
    config = {
        "model_type": MODEL_TYPE,
        "architectures": ["ButterflySequential"],
        "input_dim": input_dim,
        "layers": layers_spec,
    }
    args = SequentialArgs.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, layer in enumerate(args.layers):
        for name, shape in tensor_shapes(layer, n).items():
            if name.endswith(("norm1.weight", "norm2.weight")):
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                fan_in = shape[-1] if len(shape) == 2 else args.dims[n]
                t = (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
            tensors[name] = t.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"))
    return out


FAMILY = Family(
    name=MODEL_TYPE,
    parse=SequentialArgs.from_config,
    num_layers=lambda a: len(a.layers),
    layer_infos=layer_infos,
    load_stage=load_stage,
    input_kind="vectors",
)
