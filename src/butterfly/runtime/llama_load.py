"""Loading a Llama-style stage from a checkpoint: the tensors its layers need, read and
checked by name and shape, q/k/v and gate/up stacked into one matrix each (a decode step
is a handful of matrix-vector products and every call costs), and each matrix put on the
kernel measured fastest for its shape (runtime/linear.py `prepare`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from butterfly.runtime import fused_layers, native
from butterfly.runtime.linear import Weight, decode_threads, prepare, weight_bytes
from butterfly.runtime.llama import LlamaStage
from butterfly.runtime.llama_args import Block, LlamaArgs, layer_infos
from butterfly.runtime.precision import Precision
from butterfly.runtime.stage import Family
from butterfly.runtime.torch_thread import threads as torch_threads
from butterfly.runtime.weights import CheckpointReader
from butterfly.types.model import LayerRange

log = logging.getLogger(__name__)


def load_stage(reader: CheckpointReader, args: LlamaArgs, layers: LayerRange) -> LlamaStage:
    layers.check_within(args.n_layers)
    d, dh, i_size = args.dim, args.head_dim, args.intermediate
    q_out, kv_out = args.n_heads * dh, args.n_kv_heads * dh
    first, last = layers.start == 0, layers.end == args.n_layers
    embed_name = "model.embed_tokens.weight"
    head_name = embed_name if args.tie_embeddings else "lm_head.weight"
    attn_sizes = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": d}
    mlp_sizes = {"gate_proj": i_size, "up_proj": i_size, "down_proj": d}

    def bias(full: str, size: int, declared: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        """A declared bias must exist (MissingTensor names it); an undeclared one that
        exists is read too, one projection at a time: none is dropped."""
        return [(full, (size,))] if declared or reader.has(full) else []

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
        for name, size in attn_sizes.items():
            declared = args.attention_bias or (args.qkv_bias and name != "o_proj")
            wanted += bias(f"{p}.self_attn.{name}.bias", size, declared)
        for name, size in mlp_sizes.items():
            wanted += bias(f"{p}.mlp.{name}.bias", size, args.mlp_bias)
        if args.qk_norm:
            wanted += [
                (f"{p}.self_attn.q_norm.weight", (dh,)),
                (f"{p}.self_attn.k_norm.weight", (dh,)),
            ]
    if first:
        wanted.append((embed_name, (args.vocab_size, d)))
    if last:
        wanted.append(("model.norm.weight", (d,)))
        if head_name != embed_name or not first:
            wanted.append((head_name, (args.vocab_size, d)))
    slack = fused_saving_us(args, decode_threads())  # before the stage's own weights
    w = reader.read_many(wanted)
    precision = args.precision

    def fused_bias(prefix: str, names: dict[str, int]) -> torch.Tensor | None:
        parts = [w.pop(f"{prefix}.{x}.bias", None) for x in names]
        if all(b is None for b in parts):
            return None
        return torch.cat(
            [b if b is not None else torch.zeros(size, dtype=args.dtype)
             for b, size in zip(parts, names.values(), strict=True)]
        )  # fmt: skip

    blocks = []
    # fused_layers.py: only where the compiled layers can run these layers at all
    fusable: dict[str, Any] = {"precision": precision, "fused_slack_us": slack}
    fusable["fusable"] = fused_layers.could_plan(args)
    for i, n in enumerate(layers):
        reader.progress("pack", i, len(layers))
        p, m = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
        qkv = {x: attn_sizes[x] for x in ("q_proj", "k_proj", "v_proj")}
        blocks.append(
            Block(
                attn_norm=w.pop(f"model.layers.{n}.input_layernorm.weight"),
                wqkv=prepare(torch.cat([w.pop(f"{p}.{x}.weight") for x in qkv]), **fusable),
                bqkv=fused_bias(p, qkv),
                wo=prepare(w.pop(f"{p}.o_proj.weight"), **fusable),
                bo=w.pop(f"{p}.o_proj.bias", None),
                mlp_norm=w.pop(f"model.layers.{n}.post_attention_layernorm.weight"),
                w13=prepare(
                    torch.cat([w.pop(f"{m}.gate_proj.weight"), w.pop(f"{m}.up_proj.weight")]),
                    **fusable,
                ),
                b13=fused_bias(m, {"gate_proj": i_size, "up_proj": i_size}),
                w2=prepare(w.pop(f"{m}.down_proj.weight"), **fusable),
                b2=w.pop(f"{m}.down_proj.bias", None),
                q_norm=w.pop(f"{p}.q_norm.weight", None),
                k_norm=w.pop(f"{p}.k_norm.weight", None),
            )
        )
    embed = w.get(embed_name) if first else None
    head: Weight | None = w.get(head_name) if last else None
    if isinstance(head, torch.Tensor) and head is not embed:  # a tied head stays the embedding
        # and a tied head read again on a later stage is the embedding too: never int8.
        # Blocked, an fp32 stage's head runs with the final norm in one compiled call
        # (fused_layers.head_rows, from LlamaStage.forward_floats); on `plain` both run on
        # torch's operations and the output is a tensor encoded again. The small model's
        # [259, 768] head timed a little faster on `plain`, and its last stage then took
        # 1.0-1.2 ms from the layers' end to the output's bytes in a 4-node cluster,
        # against 0.18 ms on the other stages (Intel Xeon, thirty-first session): so it
        # gets the layers' allowance, what the call saves per matrix (measured on the
        # layers' precision: an int8 model's fp32 tied head takes the int8 layers'). Timed
        # on one decode row, as every matrix is; a prefill's head (an audit, prompt
        # scoring) then runs blocked too, at what the blocked kernel's prompt tiles give.
        head = prepare(
            head,
            Precision(args.dtype) if args.tie_embeddings else precision,
            fusable=fusable["fusable"] and args.dtype == torch.float32,
            fused_slack_us=slack,
        )
    return LlamaStage(args, layers, blocks, embed, w.get("model.norm.weight"), head)


SAVING_STEPS = 16
SAVING_POSITION = 64  # the decode row attends to this many cached positions


def fused_saving_us(args: LlamaArgs, threads: int) -> float:
    """Microseconds the compiled layers save per matrix over torch's operations for
    layers shaped as `args`' on this machine, on `threads` torch threads (once per
    process and shape, `_saving_us`); 0 where they cannot run such layers. It is what a
    `blocked` product may lose to the fastest and still be kept (runtime/linear.py
    `FUSED_SLACK_US`): about 35 us for the tiny model's matrices on the AMD EPYC, 179
    for the small model's on the Intel Xeon, whose thread team wakes slowly for each of
    torch's operations."""
    if not fused_layers.could_plan(args):
        return 0.0
    dims = (args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate)
    return _saving_us(dims, args.activation, args.precision, threads)


@functools.cache
def _saving_us(
    dims: tuple[int, int, int, int, int], activation: str, precision: Precision, threads: int
) -> float:
    """One layer of these dimensions, its matrices blocked in `precision` and filled with
    constants (no generator: a large model's layer is filled at memset speed), a decode
    row at `SAVING_POSITION` timed on torch's operations and in the compiled call: both
    run the same products, so the difference is what the call saves. Holds one layer's
    weights while it runs, before the stage's own are read."""
    d, heads, kv_heads, head_dim, inner = dims
    dtype = precision.dtype
    args = LlamaArgs(vocab_size=2, dim=d, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                     head_dim=head_dim, intermediate=inner, norm_eps=1e-5, rope_theta=1e4,
                     rope_scaling=(), max_context=SAVING_POSITION + 1, tie_embeddings=False,
                     activation=activation, dtype=dtype,
                     quantization=precision.quantization)  # fmt: skip

    def matrix(rows: int, cols: int) -> Weight:
        if precision.quantization == "int8":
            q = torch.ones(rows, cols, dtype=torch.int8)
            return native.block_int8(q, torch.full((rows,), cols**-0.5, dtype=dtype))
        return native.block(torch.full((rows, cols), cols**-0.5, dtype=dtype))

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    block = Block(
        attn_norm=torch.ones(d, dtype=dtype),
        wqkv=matrix(q_out + 2 * kv_out, d),
        bqkv=None,
        wo=matrix(d, q_out),
        bo=None,
        mlp_norm=torch.ones(d, dtype=dtype),
        w13=matrix(2 * inner, d),
        b13=None,
        w2=matrix(d, inner),
        b2=None,
    )
    stage = LlamaStage(args, LayerRange(0, 1), [block], None, None, None)
    with torch_threads(threads):
        micros = stage.decode_micros(SAVING_STEPS, SAVING_POSITION)
    if micros is None:  # the compiled layers disagree with torch's here: never used
        return 0.0
    saving = max(0.0, (micros[0] - micros[1]) / 4)
    log.info("the compiled layers save %.0f us per matrix of %s %s (us a step: %s)",
             saving, dims, precision.name, micros)  # fmt: skip
    return saving


def stage_bytes(stage: LlamaStage) -> int:
    """Bytes of every tensor the stage holds: what the memory check must equal."""
    tensors: list[Weight | None] = [stage.embed, stage.norm]
    if stage.head is not None and stage.head is not stage.embed:
        tensors.append(stage.head)
    for blk in stage.blocks:
        tensors += [blk.attn_norm, blk.wqkv, blk.bqkv, blk.wo, blk.bo, blk.mlp_norm]
        tensors += [blk.w13, blk.b13, blk.w2, blk.b2, blk.q_norm, blk.k_norm]
    return sum(weight_bytes(t) for t in tensors if t is not None)


FAMILY = Family(
    name="llama",
    parse=LlamaArgs.from_config,
    num_layers=lambda a: a.n_layers,
    layer_infos=layer_infos,
    load_stage=load_stage,
)
