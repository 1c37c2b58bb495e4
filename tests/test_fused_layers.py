"""The compiled llama layers (runtime/llama_layers.c) equal llama.py's torch operations
on every variant the family loads, and run where they apply and only there."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from butterfly.runtime import fused_layers, llama_load, native
from butterfly.runtime import linear as lin
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.llama import LlamaStage
from butterfly.runtime.llama_args import Block, LlamaArgs
from butterfly.runtime.loader import load_stage, num_layers
from butterfly.runtime.precision import quantize_int8
from butterfly.runtime.stage import forward_floats
from butterfly.runtime.wire import decode_tensor, encode_tensor, read_tensor
from butterfly.types.errors import InvalidInput
from butterfly.types.model import LayerRange

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)

BASE = LlamaArgs(
    vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=16,
    intermediate=96, norm_eps=1e-5, rope_theta=10000.0, rope_scaling=(),
    max_context=600, tie_embeddings=False,
)  # fmt: skip
VARIANTS = {
    "plain": BASE,
    "grouped-query": dataclasses.replace(BASE, n_kv_heads=2),
    "qwen2 biases": dataclasses.replace(BASE, qkv_bias=True),
    "all biases": dataclasses.replace(BASE, attention_bias=True, mlp_bias=True),
    "qwen3 q/k norm": dataclasses.replace(BASE, qk_norm=True, n_kv_heads=1),
    "gelu": dataclasses.replace(BASE, activation="gelu"),
    "gelu tanh": dataclasses.replace(BASE, activation="gelu_pytorch_tanh"),
    "relu": dataclasses.replace(BASE, activation="relu"),
    "odd sizes": dataclasses.replace(BASE, dim=72, intermediate=100, head_dim=18),
    # heads past 64 values: the attention's value sums run 64 at a time, then 16, then one
    "wide heads": dataclasses.replace(BASE, n_heads=2, n_kv_heads=1, head_dim=136),
    "heads of 80": dataclasses.replace(BASE, n_heads=2, n_kv_heads=2, head_dim=80),
}


def stages(args: LlamaArgs, seed: int = 0, spread: float = 0.15) -> tuple[LlamaStage, LlamaStage]:
    """The same middle stage twice: compiled layers, and llama.py's operations only; in
    the args' dtype, from fp32 values that bf16 holds exactly. `spread`: the weights'
    standard deviation."""
    g = torch.Generator().manual_seed(seed)
    d, dh, i = args.dim, args.head_dim, args.intermediate
    qkv = (args.n_heads + 2 * args.n_kv_heads) * dh

    def rand(*shape: int, scale: float = spread) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(args.dtype)

    def maybe(flag: bool, size: int) -> torch.Tensor | None:
        return rand(size) if flag else None

    blocks = [
        Block(
            attn_norm=1 + rand(d),
            wqkv=native.block(rand(qkv, d)),
            bqkv=maybe(args.attention_bias or args.qkv_bias, qkv),
            wo=native.block(rand(d, args.n_heads * dh)),
            bo=maybe(args.attention_bias, d),
            mlp_norm=1 + rand(d),
            w13=native.block(rand(2 * i, d)),
            b13=maybe(args.mlp_bias, 2 * i),
            w2=native.block(rand(d, i)),
            b2=maybe(args.mlp_bias, d),
            q_norm=1 + rand(dh) if args.qk_norm else None,
            k_norm=1 + rand(dh) if args.qk_norm else None,
        )
        for _ in range(args.n_layers)
    ]
    layers = LayerRange(0, args.n_layers)
    fused = LlamaStage(args, layers, blocks, None, None, None)
    reference = LlamaStage(args, layers, blocks, None, None, None)
    reference._fused = None  # never planned: llama.py's operations
    return fused, reference


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Rows of each compiled call a step made (not the check when planned)."""
    made: list[int] = []
    real = LlamaStage._run_fused

    def counted(stage: LlamaStage, h: torch.Tensor, *rest: object) -> None:
        made.append(h.shape[0])  # the rows [N, D]
        real(stage, h, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(LlamaStage, "_run_fused", counted)
    yield made


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_prompt_then_decode_steps_equal_the_torch_operations(
    variant: str, calls: list[int]
) -> None:
    args = VARIANTS[variant]
    fused, reference = stages(args)
    g = torch.Generator().manual_seed(1)
    caches = [fused.new_cache(), reference.new_cache()]
    prompt = torch.randn(1, 9, args.dim, generator=g)
    close(fused.forward(prompt, caches[0], 0), reference.forward(prompt, caches[1], 0))
    for pos in range(9, 21):
        x = torch.randn(1, 1, args.dim, generator=g)
        close(fused.forward(x, caches[0], pos), reference.forward(x, caches[1], pos))
    assert calls == [9] + [1] * 12  # every step compiled, none on the reference
    assert caches[0].length == caches[1].length == 21
    for layer in range(args.n_layers):
        for got, want in zip(caches[0].layer(layer), caches[1].layer(layer), strict=True):
            close(got[:, :, :21], want[:, :, :21])


@pytest.mark.parametrize("variant", ["plain", "odd sizes"])
def test_large_activations_and_peaked_attention_equal_the_torch_operations(
    variant: str, calls: list[int]
) -> None:
    """Weights ten times wider: SiLU sees inputs of hundreds, where its exponential is
    held to its range (llama_layers.c's exp16), and attention scores far apart, whose
    softmax is nearly one-hot. Lanes of 16 and the scalar tails ("odd sizes") alike."""
    args = VARIANTS[variant]
    fused, reference = stages(args, spread=1.5)
    g = torch.Generator().manual_seed(4)
    caches = [fused.new_cache(), reference.new_cache()]
    prompt = torch.randn(1, 20, args.dim, generator=g) * 4
    got, want = fused.forward(prompt, caches[0], 0), reference.forward(prompt, caches[1], 0)
    assert float(want.abs().max()) > 1e3  # the range this test is for was reached
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    for pos in range(20, 40):
        x = torch.randn(1, 1, args.dim, generator=g) * 4
        got, want = fused.forward(x, caches[0], pos), reference.forward(x, caches[1], pos)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    assert calls == [20] + [1] * 20


def test_a_long_prompt_runs_on_torch_and_decoding_goes_on_past_the_cache_chunk(
    calls: list[int],
) -> None:
    """A 250-row prompt is over MAX_ROWS: torch's attention writes the cache, the compiled
    steps read it and make it grow past its first 256 positions."""
    fused, reference = stages(VARIANTS["grouped-query"])
    g = torch.Generator().manual_seed(2)
    caches = [fused.new_cache(), reference.new_cache()]
    prompt = torch.randn(1, 250, BASE.dim, generator=g)
    close(fused.forward(prompt, caches[0], 0), reference.forward(prompt, caches[1], 0))
    assert calls == []
    for pos in range(250, 262):
        x = torch.randn(1, 1, BASE.dim, generator=g)
        close(fused.forward(x, caches[0], pos), reference.forward(x, caches[1], pos))
    assert len(calls) == 12 and caches[0].capacity > 256


def test_a_batch_of_rows_at_different_positions(calls: list[int]) -> None:
    fused, reference = stages(VARIANTS["qwen2 biases"])
    g = torch.Generator().manual_seed(3)
    outs = []
    for stage in (fused, reference):
        caches = [stage.new_cache() for _ in range(3)]
        for cache, n in zip(caches, (4, 11, 1), strict=True):
            stage.forward(torch.randn(1, n, BASE.dim, generator=torch.Generator()), cache, 0)
        x = torch.randn(3, 2, BASE.dim, generator=g)
        outs.append(stage.forward_rows(x, caches, [4, 11, 1]))
        g.manual_seed(3)
    close(outs[0], outs[1])
    assert calls[-1] == 6


def test_packed_entries_of_different_lengths_and_their_trace(calls: list[int]) -> None:
    fused, reference = stages(VARIANTS["qwen3 q/k norm"])
    lengths, starts = [1, 7, 1], [5, 0, 3]
    outs, traces = [], []
    for stage in (fused, reference):
        g = torch.Generator().manual_seed(4)
        caches = [stage.new_cache() for _ in lengths]
        for cache, start in zip(caches, starts, strict=True):
            if start:
                stage.forward(torch.randn(1, start, BASE.dim, generator=g), cache, 0)
        x = torch.randn(1, sum(lengths), BASE.dim, generator=g)
        trace: list[torch.Tensor] = []
        outs.append(stage.forward_packed(x, caches, starts, lengths, trace=trace))
        traces.append(trace)
    close(outs[0], outs[1])
    assert len(traces[0]) == len(traces[1]) == BASE.n_layers
    for got, want in zip(*traces, strict=True):
        assert got.shape == want.shape
        close(got, want)
    assert calls[-1] == sum(lengths)


def test_a_position_past_the_rotary_tables_is_refused_before_the_call() -> None:
    """The compiled call reads each row's rotation at its position: a position the tables
    do not cover must be an error here, not a read past their end."""
    fused, _ = stages(BASE)
    plan = fused._fused
    assert plan is not None
    cos, sin = torch.ones(8, BASE.head_dim), torch.zeros(8, BASE.head_dim)
    x, cache = torch.randn(1, BASE.dim), fused.new_cache()
    out = fused_layers.run(plan, x, [cache], [0], [0], cos, sin)  # nothing cached yet
    assert out.shape == (1, BASE.dim) and bool(out.isfinite().all())
    with pytest.raises(ValueError, match="past the rotary tables' 8"):
        fused_layers.run(plan, x, [cache], [0], [8], cos, sin)
    with pytest.raises(TypeError, match="fp32"):
        fused_layers.run(plan, x, [cache], [0], [0], cos.bfloat16(), sin.bfloat16())


def test_not_planned_where_it_does_not_apply() -> None:
    fused, _ = stages(BASE)
    assert fused_layers.plan(dataclasses.replace(BASE, dtype=torch.bfloat16), fused.blocks) is None
    plain = torch.randn(BASE.dim, BASE.intermediate)
    dense = [dataclasses.replace(b, w2=plain) for b in fused.blocks]
    assert fused_layers.plan(BASE, dense) is None
    plan = fused_layers.plan(BASE, fused.blocks)
    assert plan is not None
    cache = fused.new_cache()
    assert fused_layers.fits(plan, 1, [cache])
    assert not fused_layers.fits(plan, fused_layers.MAX_ROWS + 1, [cache])
    assert not fused_layers.fits(plan, 2, [cache, cache])  # one cache twice: torch's path
    other = stages(VARIANTS["grouped-query"])[0].new_cache()
    assert not fused_layers.fits(plan, 1, [other])  # another stage's cache shape


def test_an_input_in_any_memory_layout(calls: list[int]) -> None:
    fused, reference = stages(BASE)
    x = torch.randn(BASE.dim, 5, 1).permute(2, 1, 0)  # [1, 5, D], not row-major
    assert not x.is_contiguous()
    close(fused.forward(x, fused.new_cache(), 0), reference.forward(x, reference.new_cache(), 0))
    assert calls == [5]


def test_one_request_named_twice_in_a_batch_runs_on_torch(calls: list[int]) -> None:
    """Two rows on one cache at one position: both write the same slot, which two threads
    must not do at once. llama.py's path writes them in order."""
    fused, reference = stages(BASE)
    x = torch.randn(2, 1, BASE.dim)
    outs = []
    for stage in (fused, reference):
        cache = stage.new_cache()
        stage.forward(torch.randn(1, 3, BASE.dim, generator=torch.Generator()), cache, 0)
        outs.append(stage.forward_rows(x, [cache, cache], [3, 3]))
    close(outs[0], outs[1])
    assert calls == [3]  # the prompt only


def test_bf16_is_at_least_as_close_to_fp32_as_torchs_bf16_operations(calls: list[int]) -> None:
    """The compiled bf16 layers compute in fp32 on the weights' bf16 values and round the
    output and the cache: against the same model in fp32 (the same weight values), they
    must be no further off than llama.py's bf16 operations, which round after each."""
    if not native.available(torch.bfloat16):
        pytest.skip("no bf16 blocked kernel here")
    args = dataclasses.replace(VARIANTS["qwen2 biases"], n_kv_heads=2, dtype=torch.bfloat16)
    fused, torch_ops = stages(args)
    exact = stages(dataclasses.replace(args, dtype=torch.float32))[1]
    g = torch.Generator().manual_seed(5)
    caches = [s.new_cache() for s in (fused, torch_ops, exact)]
    prompt = torch.randn(1, 6, args.dim, generator=g).to(torch.bfloat16)
    steps = [prompt] + [
        torch.randn(1, 1, args.dim, generator=g).to(torch.bfloat16) for _ in range(8)
    ]
    errors: dict[str, float] = {"fused": 0.0, "torch": 0.0}
    pos = 0
    for x in steps:
        want = exact.forward(x.float(), caches[2], pos)
        for name, stage, cache in (("fused", fused, caches[0]), ("torch", torch_ops, caches[1])):
            got = stage.forward(x, cache, pos)
            assert got.dtype == torch.bfloat16
            errors[name] = max(errors[name], float((got.float() - want).abs().max()))
        pos += x.shape[1]
    assert calls == [6] + [1] * 8
    assert errors["fused"] <= errors["torch"] + 1e-3, errors
    assert errors["fused"] < 0.1, errors  # measured 0.065 against torch's 0.148


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 0.1), (torch.float32, 1e-4)])
def test_int8_matrices_equal_the_same_weights_widened(
    calls: list[int], dtype: torch.dtype, bound: float
) -> None:
    """model.quantization = "int8": the blocked int8 matrices (a quarter of fp32's bytes)
    run compiled too, and compute what their dequantized fp32 values compute: within
    bf16's rounding of the output and the cache, or within fp32's (every width here is a
    multiple of 4, so on a CPU with VNNI this is the byte-pass product)."""
    if not native.available(torch.int8):
        pytest.skip("no int8 blocked kernel here")
    args = dataclasses.replace(BASE, n_kv_heads=2, dtype=dtype, quantization="int8")
    fused, _ = stages(dataclasses.replace(args, quantization="none"))
    for blk in fused.blocks:  # the same matrices, quantized per output row
        for name in ("wqkv", "wo", "w13", "w2"):
            q, scales = quantize_int8(getattr(blk, name).dense())
            object.__setattr__(blk, name, native.block_int8(q, scales.to(dtype)))
    int8 = LlamaStage(args, fused.layers, fused.blocks, None, None, None)
    widened = [
        dataclasses.replace(
            blk,
            **{n: native.block(getattr(blk, n).dense()) for n in ("wqkv", "wo", "w13", "w2")},
            **{n: getattr(blk, n).float() for n in ("attn_norm", "mlp_norm")},
        )
        for blk in fused.blocks
    ]
    exact = LlamaStage(
        dataclasses.replace(BASE, n_kv_heads=2), fused.layers, widened, None, None, None
    )
    exact._fused = None
    g = torch.Generator().manual_seed(6)
    caches = [int8.new_cache(), exact.new_cache()]
    pos, worst = 0, 0.0
    for x in [torch.randn(1, 5, BASE.dim, generator=g)] + [
        torch.randn(1, 1, BASE.dim, generator=g) for _ in range(6)
    ]:
        x = x.to(dtype)
        got = int8.forward(x, caches[0], pos)
        want = exact.forward(x.float(), caches[1], pos)
        worst = max(worst, float((got.float() - want).abs().max()))
        pos += x.shape[1]
    assert calls == [5] + [1] * 6
    assert worst < bound, worst  # bf16: the output's and the cache's rounding only


def test_compiled_layers_that_disagree_with_torch_are_not_used(
    calls: list[int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A compiled call that computes something else (here: the stage's layers in reverse
    order, as a miscompiled kernel might) is found when planned, and the stage answers
    on torch's operations instead: slower, never wrong."""
    real = fused_layers.plan

    def reversed_layers(args: LlamaArgs, blocks: list[Block]) -> fused_layers.FusedLayers | None:
        fused = real(args, blocks)
        assert fused is not None
        return dataclasses.replace(fused, table=fused.table.flip(0).contiguous())

    monkeypatch.setattr(fused_layers, "plan", reversed_layers)
    stage, reference = stages(BASE)
    x = torch.randn(1, 4, BASE.dim, generator=torch.Generator().manual_seed(8))
    close(stage.forward(x, stage.new_cache(), 0), reference.forward(x, reference.new_cache(), 0))
    assert stage._fused is None and calls == []
    assert "disagree with torch's operations" in caplog.text
    monkeypatch.setattr(fused_layers, "plan", real)
    assert stages(BASE)[0]._fused is not None  # the real table passes the same check


def _allowed(tid: str) -> set[int]:
    """The CPUs a thread of this process may run on."""
    return set(os.sched_getaffinity(int(tid)))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_team_thread_on_its_masters_cpu_moves_off_it(calls: list[int]) -> None:
    """A compiled call's second thread, woken where its master runs, leaves that CPU:
    otherwise both share one core until the load balancer moves one (four small-model
    layers on two threads, AMD EPYC: 7.3 ms after a pause against 3.0 ms). The master is held to
    one CPU while it creates its team, so the team's thread starts on that CPU, as a
    woken thread would; it moves to the process's other CPUs."""
    fused, _ = stages(BASE)
    cpus = os.sched_getaffinity(0)
    first = min(cpus)
    seen: dict[str, set[int]] = {}
    failed: list[BaseException] = []

    def master() -> None:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            os.sched_setaffinity(0, {first})  # this thread only; its team inherits it
            before = set(os.listdir("/proc/self/task"))
            x = torch.randn(1, 1, BASE.dim, generator=torch.Generator().manual_seed(3))
            with torch.inference_mode():
                fused.forward(x, fused.new_cache(), 0)
            for tid in set(os.listdir("/proc/self/task")) - before:
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    seen[tid] = _allowed(tid)
        except BaseException as e:  # reported on the test's thread
            failed.append(e)
        finally:
            torch.set_num_threads(threads)

    thread = threading.Thread(target=master)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    if failed:
        raise failed[0]
    assert calls == [1]
    assert seen, "the call started no thread of its own"
    assert cpus - {first} in seen.values()  # the team's thread: every CPU but the master's
    assert {first} not in seen.values()


def _as(stage: LlamaStage, place: str, seed: int = 9) -> LlamaStage:
    """The same layers as a first stage (an embedding), a last one (a final norm and a
    head), the whole model (both) or a middle one, in fp32."""
    g = torch.Generator().manual_seed(seed)
    a = stage.args
    embed = torch.randn(a.vocab_size, a.dim, generator=g) if place in ("first", "whole") else None
    norm = 1 + 0.1 * torch.randn(a.dim, generator=g)
    head = torch.randn(a.vocab_size, a.dim, generator=g)
    last = place in ("last", "whole")
    return LlamaStage(
        a, stage.layers, stage.blocks, embed, norm if last else None, head if last else None
    )


def _inputs(stage: LlamaStage, g: torch.Generator, rows: int, n: int) -> torch.Tensor:
    """`rows` requests' `n` positions each, as the stage takes them."""
    if stage.embed is not None:
        return torch.randint(0, stage.args.vocab_size, (rows, n), generator=g)
    return torch.randn(rows, n, stage.args.dim, generator=g)


def _same_caches(mine: list[KVCache], theirs: list[KVCache]) -> None:
    """Each pair holds the same positions, bit for bit."""
    for a, b in zip(mine, theirs, strict=True):
        assert a.length == b.length
        for layer in range(BASE.n_layers):
            for got_kv, want_kv in zip(a.layer(layer), b.layer(layer), strict=True):
                assert torch.equal(got_kv[:, :, : a.length], want_kv[:, :, : b.length])


@pytest.mark.parametrize("place", ["middle", "last", "first", "whole"])
def test_decode_rows_on_the_wire_bytes_equal_forward_rows_bit_for_bit(place: str) -> None:
    """A decode step answered on the frame's own bytes (`forward_floats`, what a node's
    stage server runs for plain decode steps) is the tensor path's answer exactly:
    outputs, the caches it fills, and a batch of requests at different positions; token
    ids in on a first stage, logits out on a last."""
    layers = stages(VARIANTS["grouped-query"])[0]
    on_bytes, on_tensors = _as(layers, place), _as(layers, place)
    g = torch.Generator().manual_seed(11)
    mine, theirs = (
        [on_bytes.new_cache() for _ in range(3)],
        [on_tensors.new_cache() for _ in range(3)],
    )
    for n, a, b in zip((5, 9, 2), mine, theirs, strict=True):
        prompt = _inputs(on_bytes, g, 1, n)
        on_bytes.forward(prompt, a, 0)
        on_tensors.forward(prompt, b, 0)
    starts = [5, 9, 2]
    calls = 0
    real = fused_layers.run_floats

    def counted(*args: object) -> None:
        nonlocal calls
        calls += 1
        real(*args)  # type: ignore[arg-type]

    for _ in range(6):
        x = _inputs(on_bytes, g, 3, 1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_layers, "run_floats", counted)
            wire = encode_tensor(x.reshape(1, 3, *x.shape[2:]))
            got = forward_floats(on_bytes, read_tensor(wire), mine, starts)
        want = on_tensors.forward_rows(x, theirs, starts, last_only=True)
        assert got is not None
        assert torch.equal(decode_tensor(got), want.reshape(1, 3, -1))
        starts = [s + 1 for s in starts]
    assert calls == 6
    _same_caches(mine, theirs)


def test_token_ids_outside_the_vocabulary_are_refused_on_the_wire_bytes_too() -> None:
    stage = _as(stages(BASE)[0], "first")
    for bad in (-1, BASE.vocab_size):
        cache = stage.new_cache()
        wire = read_tensor(encode_tensor(torch.tensor([[3, bad]])))
        with pytest.raises(InvalidInput, match=r"token ids must lie in \[0, 64\)"):
            forward_floats(stage, wire, [cache, stage.new_cache()], [0, 0])
        assert cache.length == 0


def test_decode_rows_on_the_wire_bytes_only_where_they_apply() -> None:
    """Where the bytes path does not apply it answers None before touching anything, and
    the caller runs `forward_rows`: a first stage sent vectors, a later one token ids,
    bf16, rows of more than one position, a dtype on the wire other than fp32, no
    compiled layers."""
    fused, reference = stages(BASE)
    bf16 = stages(dataclasses.replace(BASE, dtype=torch.bfloat16))[0]
    first = _as(fused, "first")
    one = torch.randn(1, 1, BASE.dim)
    cases = [
        (first, encode_tensor(one), [0]),
        (first, encode_tensor(torch.tensor([[3, 4]])), [0]),  # two positions, one row
        (fused, encode_tensor(torch.tensor([[3]])), [0]),
        (bf16, encode_tensor(one.bfloat16()), [0]),
        (fused, encode_tensor(torch.randn(1, 2, BASE.dim)), [0]),  # two positions, one row
        (fused, encode_tensor(one.double().float().half()), [0]),
        (reference, encode_tensor(one), [0]),
    ]
    for stage, payload, starts in cases:
        cache = stage.new_cache()
        assert forward_floats(stage, read_tensor(payload), [cache], starts) is None
        assert cache.length == 0
    with pytest.raises(ValueError, match="not 1 rows"):
        fused_layers.run_floats(
            fused._fused, array("f", [0.0] * 3), [fused.new_cache()], [0], (0, 0, 1)
        )  # type: ignore[arg-type]


def test_decode_rows_on_the_wire_bytes_int8_matrices_int32_ids_and_caches_that_grow() -> None:
    """The bytes path on the whole model with int8 matrices, token ids sent as int32,
    caches of different capacities in one batch and positions past the rotary tables it
    first planned (the tables and a cache grow inside the call), against forward_rows."""
    if not native.available(torch.int8):
        pytest.skip("no int8 blocked kernel here")
    args = dataclasses.replace(BASE, n_kv_heads=2, quantization="int8")
    layers = stages(dataclasses.replace(args, quantization="none"))[0]
    for blk in layers.blocks:
        for name in ("wqkv", "wo", "w13", "w2"):
            q, scales = quantize_int8(getattr(blk, name).dense())
            object.__setattr__(blk, name, native.block_int8(q, scales))
    on_bytes, on_tensors = (
        _as(LlamaStage(args, layers.layers, layers.blocks, None, None, None), "whole")
        for _ in range(2)
    )
    g = torch.Generator().manual_seed(12)
    mine, theirs = (
        [on_bytes.new_cache() for _ in range(2)],
        [on_tensors.new_cache() for _ in range(2)],
    )
    starts = [300, 250]  # caches of 512 and 256 positions, the tables of 300
    for n, a, b in zip(starts, mine, theirs, strict=True):
        prompt = _inputs(on_bytes, g, 1, n)
        on_bytes.forward(prompt, a, 0)
        on_tensors.forward(prompt, b, 0)
    assert mine[0].capacity != mine[1].capacity
    for _ in range(10):  # the tables grow at once, the second cache past position 256
        x = _inputs(on_bytes, g, 2, 1).int()
        got = forward_floats(on_bytes, read_tensor(encode_tensor(x.reshape(1, 2))), mine, starts)
        want = on_tensors.forward_rows(x.long(), theirs, starts, last_only=True)
        assert got is not None
        assert torch.equal(decode_tensor(got), want.reshape(1, 2, -1))
        starts = [s + 1 for s in starts]
    assert mine[1].capacity > 256
    _same_caches(mine, theirs)


def test_an_embedding_table_the_bytes_path_cannot_read_row_by_row_is_left_to_torch() -> None:
    """A first stage's table of another dtype or layout than fp32 [vocab, dim] makes the
    bytes path answer None (torch's embedding then), never rows read as the wrong type;
    a replaced table is read anew."""
    stage = _as(stages(BASE)[0], "first")
    ids = read_tensor(encode_tensor(torch.tensor([[1, 2]])))
    table = stage.embed
    assert table is not None
    for other in (table.bfloat16(), table.t().contiguous().t(), table.half()):
        stage.embed = other
        assert forward_floats(stage, ids, [stage.new_cache(), stage.new_cache()], [0, 0]) is None
    stage.embed = table * 2
    doubled = _as(stages(BASE)[0], "first")
    doubled.embed = stage.embed
    got = forward_floats(stage, ids, [stage.new_cache(), stage.new_cache()], [0, 0])
    want = forward_floats(doubled, ids, [doubled.new_cache(), doubled.new_cache()], [0, 0])
    assert got is not None and got == want


def test_the_saving_per_matrix_is_measured_on_layers_shaped_as_the_models() -> None:
    """Both paths run the same blocked products, so what torch's operations cost beyond
    the compiled call is the call's saving: measured wherever the call applies (fp32,
    bf16, int8 matrices, grouped-query), nothing where it cannot run (fp16 compute)."""
    for args in (BASE, VARIANTS["grouped-query"], dataclasses.replace(BASE, quantization="int8"),
                 dataclasses.replace(BASE, dtype=torch.bfloat16)):  # fmt: skip
        assert fused_layers.could_plan(args)
        assert llama_load.fused_saving_us(args, 1) > 0, args
    fp16 = dataclasses.replace(BASE, dtype=torch.float16)
    assert not fused_layers.could_plan(fp16) and llama_load.fused_saving_us(fp16, 1) == 0.0


def test_the_saving_is_timed_on_a_real_layer_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, float] | None] = []
    timed = LlamaStage.decode_micros

    def spy(stage: LlamaStage, steps: int, position: int) -> tuple[float, float] | None:
        seen.append(timed(stage, steps, position))
        return seen[-1]

    monkeypatch.setattr(LlamaStage, "decode_micros", spy)
    monkeypatch.setattr(
        llama_load, "_saving_us", functools.cache(llama_load._saving_us.__wrapped__)
    )
    args = dataclasses.replace(BASE, dim=80)
    saving = llama_load.fused_saving_us(args, 1)
    assert len(seen) == 1 and seen[0] is not None
    torch_us, compiled_us = seen[0]
    assert torch_us > compiled_us > 0 and saving == pytest.approx((torch_us - compiled_us) / 4)


@pytest.mark.parametrize(("saving_us", "fused"), [(80.0, True), (20.0, False)])
def test_a_loaded_stage_keeps_blocked_matrices_losing_less_than_the_measured_saving(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, saving_us: float, fused: bool
) -> None:
    """Blocked 50 us slower than plain (past the 10% margin and the default 30 us): with
    the call measured to save 80 us per matrix every layer stays blocked and the stage
    runs in one call; measured to save 20, the products go to plain and the stage to
    torch's operations."""
    monkeypatch.setattr(lin, "_CHOSEN", {})
    monkeypatch.setattr(llama_load, "_saving_us", lambda *_: saving_us)
    times = {"plain": 100.0, "blocked": 150.0}
    monkeypatch.setattr(lin, "time_decode", lambda built, _p: {k: times.get(k, 9e9) for k in built})
    stage = load_stage(tiny_model, LayerRange(1, 3))
    assert isinstance(stage, LlamaStage)
    matrices = [m for blk in stage.blocks for m in (blk.wqkv, blk.wo, blk.w13, blk.w2)]
    assert all(isinstance(m, native.BlockedWeight) == fused for m in matrices)
    assert (stage._fused is not None) == fused


@pytest.mark.parametrize(("saving_us", "compiled"), [(80.0, True), (20.0, False)])
def test_a_last_stage_keeps_a_blocked_head_losing_less_than_the_measured_saving(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, saving_us: float, compiled: bool
) -> None:
    """The head timed 50 us slower blocked than plain: with the call measured to save 80
    us per matrix it stays blocked, and a decode step on the wire's bytes runs the final
    norm and head in the compiled call (`fused_layers.head_rows`); measured to save 20,
    it goes to plain and the step's end to torch's operations. The logits are the same
    either way."""
    monkeypatch.setattr(lin, "_CHOSEN", {})
    monkeypatch.setattr(llama_load, "_saving_us", lambda *_: saving_us)
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]

    def timed(built: dict[str, lin.Weight], _p: object) -> dict[str, float]:
        plain = built["plain"]  # the head's shape alone times slower blocked
        slower = isinstance(plain, torch.Tensor) and plain.shape[0] == vocab
        times = {"plain": 100.0, "blocked": 150.0 if slower else 100.0}
        return {k: times.get(k, 9e9) for k in built}

    monkeypatch.setattr(lin, "time_decode", timed)
    heads: list[int] = []
    head_rows = fused_layers.head_rows

    def counted(ends: fused_layers.Ends, h: int, rows: object, out: int) -> None:
        heads.append(1)
        head_rows(ends, h, rows, out)  # type: ignore[arg-type]

    monkeypatch.setattr(fused_layers, "head_rows", counted)
    n = num_layers(tiny_model)
    stage = load_stage(tiny_model, LayerRange(n - 1, n))
    assert isinstance(stage, LlamaStage) and stage._fused is not None
    assert isinstance(stage.head, native.BlockedWeight) == compiled
    assert (stage._ends is not None) and (stage._ends.head is not None) == compiled
    heads.clear()  # the plan's own check ran the compiled head once
    x = torch.randn(1, 1, stage.args.dim, generator=torch.Generator().manual_seed(3))
    on_bytes, on_tensors = stage.new_cache(), stage.new_cache()
    got = forward_floats(stage, read_tensor(encode_tensor(x)), [on_bytes], [0])
    assert got is not None and len(heads) == int(compiled)
    want = stage.forward_rows(x, [on_tensors], [0], last_only=True)
    torch.testing.assert_close(decode_tensor(got), want, rtol=1e-5, atol=1e-5)


def test_a_stage_the_compiled_layers_cannot_run_takes_the_fastest_product(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    """Blocked within 10% of plain is kept only for the call's sake: where the call
    cannot run the layers (could_plan false: an odd head size, say), plain wins."""
    monkeypatch.setattr(lin, "_CHOSEN", {})
    monkeypatch.setattr(fused_layers, "could_plan", lambda _args: False)
    times = {"plain": 100.0, "blocked": 105.0}
    monkeypatch.setattr(lin, "time_decode", lambda built, _p: {k: times.get(k, 9e9) for k in built})
    stage = load_stage(tiny_model, LayerRange(1, 3))
    assert isinstance(stage, LlamaStage) and stage._fused is None
    matrices = [m for blk in stage.blocks for m in (blk.wqkv, blk.wo, blk.w13, blk.w2)]
    assert not any(isinstance(m, native.BlockedWeight) for m in matrices)
