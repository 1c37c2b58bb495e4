"""A Llama-style checkpoint's architecture as its config states it (also Mistral-, Qwen2-
and Qwen3-style): the fields Butterfly honours, the ones it refuses by name, the rotary
frequencies each `rope_type` gives, a layer's tensors (`Block`) and what each layer costs.

Every config field that changes what the model computes is either honoured or refused
by name (`LlamaArgs.from_config`, `refuse_unsupported`): a checkpoint whose output would
silently differ from transformers' is not served. Kept apart from the forward pass
(runtime/llama.py), the loading (runtime/llama_load.py) and the compiled layers
(runtime/fused_layers.py), which all read it; the planner reads each layer's costs
(`layer_infos`) from it without loading anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from butterfly.runtime.linear import Weight
from butterfly.runtime.precision import Precision, Quantization
from butterfly.runtime.weights import config_count
from butterfly.types.errors import UnknownArchitecture
from butterfly.types.model import DecoderBlock, LayerInfo

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# each honoured `rope_type` and the parameters transformers' `_validate_<type>_rope_parameters`
# requires of it (a missing one is its KeyError; here it is refused at parse, not at load)
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(ROPE_REQUIRED)
# optional parameters the frequencies are computed from: numbers when stated
ROPE_NUMBERS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# fields that would change the computation, and the value under which they do not
INERT_WHEN = {
    "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "embedding_multiplier": None,
    "logits_scaling": None,
    "residual_multiplier": None,
    "attention_multiplier": None,
}


def refuse_unsupported(cfg: dict[str, Any]) -> None:
    """Refuse, naming the field, any config field this decoder would ignore."""
    for name, inert in INERT_WHEN.items():
        value = cfg.get(name, inert)
        if value is not None and value != inert:
            raise UnknownArchitecture(
                f"config field {name}={value!r} is not supported by Butterfly's llama-style "
                f"decoder (only {inert!r}); the checkpoint would compute something else"
            )
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnknownArchitecture(
            f"config field hidden_act={act!r} is not supported ({', '.join(ACTIVATIONS)})"
        )


def rope_source(cfg: dict[str, Any]) -> str:
    """The config field transformers takes the RoPE parameters from: `rope_scaling` when
    it is non-empty (a user's addition beside a re-saved `rope_parameters` wins), else
    `rope_parameters`."""
    return "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"


def standard_rope(cfg: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """The config's RoPE parameters as transformers 5 computes with them: its
    `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` and `standardize_rope_params`
    (modeling_rope_utils.py; the latter runs again in every `_compute_*_parameters`, after
    the top-level fields became attributes). In that order:
    - `rope_scaling or rope_parameters`: the whole dict of the first non-empty one;
    - `rope_theta`: the dict's own, else the top-level field, else 10000;
    - `rope_type`: the dict's, else its legacy `type`, else "default";
    - for llama3, yarn and longrope, `original_max_position_embeddings`: the top-level
      field when the config has one (it has priority, Phi-3's layout), else the dict's,
      else `max_position_embeddings`.
    Values are not checked here (`check_rope`); a per-layer (nested) dict is refused."""
    source = rope_source(cfg)
    stated = cfg.get(source) or {}
    if not isinstance(stated, dict) or any(isinstance(v, dict) for v in stated.values()):
        raise UnknownArchitecture(
            f"config field {source}={stated!r} is not one flat object of RoPE parameters "
            "(RoPE per layer type is not supported)"
        )
    rope = dict(stated)
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cfg:
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


def is_number(value: Any) -> bool:
    """A finite int or float: JSON's `true` is no factor, nor is `"4"`, which transformers
    only warns about and then fails to divide by."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_rope(rope: dict[str, Any], source: str) -> None:
    """Refuse, naming `source` and the key, standardised RoPE parameters the frequencies
    cannot be computed from as transformers computes them: another `rope_type`, a
    parameter its type requires missing or not a number, a `factor` below 1 (transformers
    states it must be >= 1), a `partial_rotary_factor` other than 1. Checked when the
    config is parsed, so a node refuses the checkpoint at start, not at stage load."""
    kind = rope["rope_type"]
    if kind not in ROPE_REQUIRED:
        raise UnknownArchitecture(
            f"config field {source} type {kind!r} is not supported ({', '.join(ROPE_TYPES)})"
        )
    where = f"config field {source} (rope_type {kind!r})"
    for key in ("rope_theta", *ROPE_REQUIRED[kind]):
        if key not in rope:
            raise UnknownArchitecture(f"{where} lacks its required parameter {key!r}")
        value = rope[key]
        if key == "factor" and kind == "yarn" and value is None:
            continue  # transformers' YaRN takes max_position_embeddings / the original
        if not is_number(value) or value <= 0:
            raise UnknownArchitecture(f"{where} has {key}={value!r}, not a positive number")
        if key == "factor" and value < 1:
            raise UnknownArchitecture(f"{where} has factor={value!r}; it must be at least 1")
    for key in ROPE_NUMBERS:
        if rope.get(key) is not None and not is_number(rope[key]):
            raise UnknownArchitecture(f"{where} has {key}={rope[key]!r}, not a number")
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise UnknownArchitecture(
            f"{where} has partial_rotary_factor={partial!r}; only 1.0 is supported"
        )


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
    activation: str = "silu"  # hidden_act
    attention_bias: bool = False  # q, k, v and o projections all have biases
    qkv_bias: bool = False  # q, k and v have biases, o not (Qwen2)
    mlp_bias: bool = False  # gate, up and down projections have biases
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    dtype: torch.dtype = torch.float32  # compute dtype (model.dtype)
    quantization: Quantization = "none"  # model.quantization

    @property
    def precision(self) -> Precision:
        return Precision(self.dtype, self.quantization)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaArgs:
        refuse_unsupported(cfg)
        try:
            dim = config_count(cfg, "hidden_size")
            n_heads = config_count(cfg, "num_attention_heads")
            max_context = config_count(cfg, "max_position_embeddings", 2048)
            rope = standard_rope(cfg, max_context)
            check_rope(rope, rope_source(cfg))
            kind = rope["rope_type"]
            if kind == "yarn" and rope["factor"] is None:  # transformers' YaRN derives it
                rope["factor"] = max_context / rope["original_max_position_embeddings"]
            scaling: tuple[tuple[str, Any], ...] = ()
            if kind not in ("default", "dynamic"):
                kept = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
                scaling = (("rope_type", kind), *sorted(kept.items()))
            # "dynamic" NTK scaling changes the frequencies only past max_position_embeddings,
            # where Butterfly's context ends: within it, it is the default rotation
            window = cfg.get("sliding_window")
            slides = cfg.get("use_sliding_window", window is not None)
            if "layer_types" in cfg and cfg.get("layer_types") is not None:
                slides = "sliding_attention" in cfg["layer_types"]
            if slides and window:
                max_context = min(
                    max_context, config_count(cfg, "sliding_window")
                )  # beyond it keys are masked; refused
            return cls(
                vocab_size=config_count(cfg, "vocab_size"),
                dim=dim,
                n_layers=config_count(cfg, "num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=config_count(cfg, "num_key_value_heads", n_heads),
                head_dim=config_count(cfg, "head_dim", dim // n_heads),
                intermediate=config_count(cfg, "intermediate_size"),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope["rope_theta"]),
                rope_scaling=scaling,
                max_context=max_context,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                activation=str(cfg.get("hidden_act", "silu")),
                attention_bias=bool(cfg.get("attention_bias", False)),
                qkv_bias=cfg.get("model_type") == "qwen2",  # Qwen2's are not in its config
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=cfg.get("model_type") == "qwen3",
            )
        except KeyError as e:
            raise UnknownArchitecture(f"llama config lacks required field {e}") from e
        except (ValueError, TypeError, ArithmeticError) as e:  # "rope_theta": "big"
            raise UnknownArchitecture(f"llama config has a value of the wrong kind: {e}") from e


@dataclass
class Block:
    attn_norm: torch.Tensor  # [D]
    wqkv: Weight  # [(H + 2 H_kv) * Dh, D]
    bqkv: torch.Tensor | None  # Qwen2 and attention_bias checkpoints (zeros for a missing one)
    wo: Weight  # [D, H * Dh]
    bo: torch.Tensor | None
    mlp_norm: torch.Tensor
    w13: Weight  # gate and up stacked: [2 * I, D]
    b13: torch.Tensor | None  # mlp_bias
    w2: Weight  # down: [D, I]
    b2: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # [Dh], Qwen3
    k_norm: torch.Tensor | None = None


def inv_frequencies(args: LlamaArgs) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [Dh / 2] and the factor cos and sin are scaled by, as
    transformers' `modeling_rope_utils` computes them for each `rope_type`."""
    dh = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    scaling = dict(args.rope_scaling)
    kind = scaling.get("rope_type")
    if kind is None:
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
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
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return yarn_frequencies(args, scaling)
    raise UnknownArchitecture(f"rope scaling type {kind!r} is not supported ({ROPE_TYPES})")


def yarn_frequencies(args: LlamaArgs, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between,
    and cos/sin scaled by the attention factor (the paper's and transformers' defaults)."""
    dim, base = args.head_dim, args.rope_theta
    old_ctx = float(scaling["original_max_position_embeddings"])
    factor = float(scaling["factor"])  # a null one was derived at parse (`from_config`)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    pos = base ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, float(attention)


def layer_infos(args: LlamaArgs) -> list[LayerInfo]:
    """Per-layer costs; FLOPs count the matrix products of one token at short context.
    Memory is what a loaded stage holds (`llama_load.stage_bytes`): matrices at one byte per weight
    plus a scale per output row under int8, everything else in the compute dtype."""
    d, dh, esize = args.dim, args.head_dim, torch.empty((), dtype=args.dtype).element_size()
    int8 = args.quantization == "int8"

    def matrix(rows: int, cols: int) -> int:  # bytes of one projection matrix
        return rows * cols + rows * esize if int8 else rows * cols * esize

    q_out, kv_out = args.n_heads * dh, args.n_kv_heads * dh
    attn = d * (args.n_heads + 2 * args.n_kv_heads) * dh + args.n_heads * dh * d
    mlp = 3 * d * args.intermediate
    biases = (q_out + 2 * kv_out) * (args.attention_bias or args.qkv_bias)
    biases += d * args.attention_bias + (2 * args.intermediate + d) * args.mlp_bias
    block_bytes = matrix(q_out + 2 * kv_out, d) + matrix(d, q_out)
    block_bytes += matrix(2 * args.intermediate, d) + matrix(d, args.intermediate)
    block_bytes += (2 * d + biases + 2 * dh * args.qk_norm) * esize
    embed_bytes = args.vocab_size * d * esize
    kind = DecoderBlock(d, args.n_heads, args.n_kv_heads, args.intermediate)
    infos = []
    for n in range(args.n_layers):
        flops = 2.0 * (attn + mlp)
        memory = block_bytes
        if n == 0:
            memory += embed_bytes
        if n == args.n_layers - 1:
            flops += 2.0 * args.vocab_size * d
            memory += d * esize  # final norm
            if not args.tie_embeddings:
                memory += matrix(args.vocab_size, d)
            elif n != 0:  # the embedding read again for the head, in the compute dtype
                memory += embed_bytes
        infos.append(
            LayerInfo(
                id=n,
                layer_type=kind,
                compute_cost=flops,
                memory_bytes=memory,
                output_size=d,
                kv_bytes_per_token=2 * args.n_kv_heads * dh * esize,
                activation_bytes_per_token=d * esize,
            )
        )
    return infos
