"""Every kernel a weight may run on computes what F.linear computes, and the choice
between them is the fastest measured, whatever the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from butterfly.runtime import linear as lin
from butterfly.runtime import native
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.precision import FP32, Precision, dequantize_int8, quantize_int8
from butterfly.types.model import LayerRange

BF16 = Precision(torch.bfloat16)
INT8 = Precision(torch.float32, "int8")
needs_packing = pytest.mark.skipif(not lin.packing_available(), reason="torch without oneDNN")


def inputs(g: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(1, 1, 512, generator=g),  # a decode step
        torch.randn(3, 17, 512, generator=g),  # a batch of prefills
        torch.randn(4, 9, 512, generator=g)[:, -1:],  # a strided view (last position)
        torch.randn(5, 1024, generator=g)[:, ::2],  # non-contiguous rows
        torch.randn(1, 201, 512, generator=g),  # a prefill: packed, padded to 208, 128 + 80
        torch.randn(2, 150, 512, generator=g),  # a batch of long prefills: 3 packed chunks
    ]


@pytest.mark.parametrize("kernel", lin.candidates(FP32))
@pytest.mark.parametrize("bias", [False, True])
def test_every_fp32_kernel_equals_f_linear(kernel: str, bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 512, generator=g)
    b = torch.randn(1024, generator=g) if bias else None
    built = lin.build(kernel, w, FP32)
    for x in inputs(g):
        torch.testing.assert_close(lin.linear(x, built, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", lin.candidates(BF16))
def test_every_bf16_kernel_equals_bf16_f_linear(kernel: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 512, generator=g) / 16
    if kernel not in lin.runnable(w, BF16):  # packed bf16 needs avx512_bf16 or AMX
        pytest.skip(f"{kernel} does not run bfloat16 on this CPU")
    built = lin.build(kernel, w, BF16)
    assert isinstance(built, (torch.Tensor, native.BlockedWeight))
    assert built.dtype == torch.bfloat16
    for x in inputs(g):
        want = F.linear(x.bfloat16(), w.bfloat16()).float()
        got = lin.linear(x.bfloat16(), built).float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", lin.candidates(INT8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_int8_kernel_equals_its_dequantized_weight(kernel: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 512, generator=g) / 16
    built = lin.build(kernel, w, Precision(dtype, "int8"))
    assert isinstance(built, (lin.Int8Weight, native.BlockedWeight))
    assert (built.q if isinstance(built, lin.Int8Weight) else built.blocks).dtype == torch.int8
    esize = torch.empty((), dtype=dtype).element_size()
    assert lin.weight_bytes(built) == 1024 * 512 + 1024 * esize
    ref = built.dense()
    q, s = quantize_int8(w)
    # per output channel, symmetric: each row's largest weight maps to +-127
    assert int(q.abs().amax(dim=1).min()) == 127
    torch.testing.assert_close(dequantize_int8(q, s), w, atol=float(s.max()) / 2 + 1e-7, rtol=0)
    b = torch.randn(1024, generator=g)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for x in inputs(g):
        want = F.linear(x.to(dtype).float(), ref.to(dtype).float(), b)
        got = lin.linear(x.to(dtype), built, b.to(dtype)).float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_the_fastest_measured_candidate_is_kept_and_exposed() -> None:
    """The choice follows the timings, not the CPU's name: a timer that makes "plain"
    slow gets the other candidate, one that makes it fast gets "plain"."""
    shape = (48, 40)  # a shape no other test loads
    w = torch.randn(*shape)
    if len(lin.candidates(FP32)) < 2:
        pytest.skip("one candidate only")
    slow_plain = lambda built, p: {k: {"plain": 9.0, "packed": 1.0}.get(k, 5.0) for k in built}  # noqa: E731
    got = lin.prepare(w, FP32, timer=slow_plain)
    assert isinstance(got, torch.Tensor) and got.is_mkldnn
    choice = next(c for c in lin.kernel_choices() if c.shape == shape)
    assert choice.kernel == "packed" and choice.micros["plain"] == 9.0
    # memoised per shape and precision: the same shape is not timed again
    again = lin.prepare(w, FP32, timer=lambda built, p: {k: 0.0 for k in built})
    assert isinstance(again, torch.Tensor) and again.is_mkldnn
    w2 = torch.randn(40, 48)
    fast_plain = lambda built, p: {k: (1.0 if k == "plain" else 9.0) for k in built}  # noqa: E731
    assert not lin.prepare(w2, FP32, timer=fast_plain).is_mkldnn  # type: ignore[union-attr]


@needs_packing
@pytest.mark.parametrize("fails", ["build", "first_call"])
def test_a_candidate_this_cpu_cannot_run_is_left_out(
    fails: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oneDNN raises for packed fp16 on a CPU without avx512_fp16 (and packed bf16
    without avx512_bf16), when packing or on the first product: the load takes another
    kernel instead of failing, whatever the CPU this test runs on."""
    monkeypatch.setattr(lin, "candidates", lambda p: ("plain", "packed"))

    def missing_kernel(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("mkldnn_reorder_linear_weight: fp16 path needs avx512_fp16")

    if fails == "build":
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing_kernel)
    else:
        monkeypatch.setattr(lin, "_packed", missing_kernel)
    shape = (24, 56 + len(fails))  # shapes no other test loads
    timer = lambda built, p: {k: {"packed": 1.0}.get(k, 9.0) for k in built}  # noqa: E731
    got = lin.prepare(torch.randn(*shape), FP32, timer=timer)
    assert isinstance(got, torch.Tensor) and not got.is_mkldnn
    choice = next(c for c in lin.kernel_choices() if c.shape == shape)
    assert choice.kernel == "plain" and "packed" not in choice.micros


@pytest.mark.skipif(not native.available(), reason="no blocked kernel here")
@pytest.mark.parametrize(
    ("plain_us", "blocked_us", "kept"),
    [
        (1000.0, 1050.0, "blocked"),  # within FUSED_MARGIN
        (1000.0, 1200.0, "plain"),  # 20% and 200 us slower
        (5.0, 12.0, "blocked"),  # 2.4x, but within FUSED_SLACK_US: the tiny model's case
        (100.0, 200.0, "plain"),  # 2x and 100 us slower
    ],
)
def test_blocked_is_kept_within_its_margin_of_the_fastest(
    plain_us: float, blocked_us: float, kept: str
) -> None:
    """Blocked weights also run a llama stage's layers in one compiled call, which a
    product's timing does not see: within FUSED_MARGIN or FUSED_SLACK_US of the fastest,
    they win there."""
    shape = (32, 48 + int(blocked_us))  # shapes no other test loads
    times = {"plain": plain_us, "blocked": blocked_us}
    timer = lambda built, p: {k: times.get(k, 9e9) for k in built}  # noqa: E731
    got = lin.prepare(torch.randn(*shape), FP32, timer=timer, fusable=True)
    assert isinstance(got, native.BlockedWeight) == (kept == "blocked")
    assert next(c for c in lin.kernel_choices() if c.shape == shape).kernel == kept
    # a weight no compiled call reads (GPT-2's, BERT's, a bf16 head) takes the fastest
    assert not isinstance(lin.prepare(torch.randn(*shape), FP32, timer=timer), native.BlockedWeight)


def test_a_row_gives_the_same_result_alone_and_in_a_batch() -> None:
    """Audits re-run a generation as one prefill and compare it with the decode steps:
    within float rounding (MKL's plain path blocks a batch differently from one row, up
    to 8e-5 on outputs of magnitude ~30; the audit's default rtol is 1e-3)."""
    g = torch.Generator().manual_seed(1)
    for kernel in lin.candidates(FP32):
        built = lin.build(kernel, torch.randn(2048, 768, generator=g), FP32)
        x = torch.randn(1, 64, 768, generator=g)
        batched = lin.linear(x, built)
        alone = torch.cat([lin.linear(x[:, i : i + 1], built) for i in range(64)], dim=1)
        torch.testing.assert_close(alone, batched, rtol=1e-5, atol=2e-4)


@needs_packing
def test_tiny_llama_with_every_matrix_packed_matches_transformers(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the timings pick on this CPU, the packed path runs the whole model here."""
    monkeypatch.setattr(lin, "candidates", lambda precision: ("packed",))
    monkeypatch.setattr(lin, "_CHOSEN", {})
    stages = [load_stage(tiny_model, LayerRange(0, 2)), load_stage(tiny_model, LayerRange(2, 4))]
    assert all(blk.wqkv.is_mkldnn and blk.w2.is_mkldnn for s in stages for blk in s.blocks)
    assert stages[1].head.is_mkldnn
    prompt = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(3))
    hf = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    with torch.inference_mode():
        ids = prompt
        for _ in range(24):
            ids = torch.cat([ids, hf(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        caches = [s.new_cache() for s in stages]
        got = stages[1].forward(stages[0].forward(prompt, caches[0], 0), caches[1], 0)
        torch.testing.assert_close(got, hf(prompt).logits, atol=1e-5, rtol=0)
    assert list(generate(stages, prompt[0].tolist(), 24)) == ids[0, 12:].tolist()


def test_packed_products_run_in_few_shapes_whatever_the_length() -> None:
    """oneDNN caches a primitive and an output-sized buffer per shape, and compiles its
    code (runtime/linear.py): one shape per prompt length grew a node's memory with every
    new length, and one per decode batch size kept adding code after the warm-up."""
    shapes: set[int] = set()
    for rows in range(1, 4097):
        chunks = lin.row_chunks(rows)
        assert sum(chunks) >= rows
        assert sum(chunks) - rows < (lin.ROW_ALIGN if rows > lin.EXACT_ROWS else rows)
        if rows <= lin.UNPADDED_ROWS:
            assert chunks == [rows]  # the common decode batches are not padded
        shapes.update(chunks)
    assert shapes == set(lin.ROW_SHAPES) and len(shapes) == 13


def code_mappings() -> int:
    """Anonymous writable-executable mappings of this process: JIT-compiled kernels."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sum(1 for line in maps if len(line.split()) == 5 and line.split()[1] == "rwxp")


@needs_packing
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="no /proc")
def test_no_kernel_is_compiled_after_load_whatever_the_rows_and_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once `prepare` returned a packed weight, no product of any row count (decode
    batches of 1-16, prompts of up to 300) on one thread or two compiles new code: the
    chain nodes' code mappings grew ~2 a minute in bench/soak.py while rare shapes
    turned up. Every product runs in one of the `ROW_SHAPES`."""
    monkeypatch.setattr(lin, "candidates", lambda precision: ("packed",))
    monkeypatch.setattr(lin, "_CHOSEN", {})
    monkeypatch.setattr(lin, "_WARMED", set())
    # a shape no other test packs, so its kernels are this test's own
    g = torch.Generator().manual_seed(5)
    with lin.timed_on_threads(2):
        weight = lin.prepare(torch.randn(208, 96, generator=g), FP32)
    assert isinstance(weight, torch.Tensor) and weight.is_mkldnn
    ran: list[int] = []
    packed = lin._packed

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ran.append(x.numel() // x.shape[-1])
        return packed(x, w, b)

    monkeypatch.setattr(lin, "_packed", counted)
    before = code_mappings()
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for count in (1, 2):
                torch.set_num_threads(count)
                for rows in range(1, 301):
                    lin.linear(torch.randn(1, rows, 96, generator=g), weight)
    finally:
        torch.set_num_threads(threads)
    assert set(ran) <= set(lin.ROW_SHAPES)
    assert code_mappings() == before


def test_the_copies_overflow_this_machines_last_level_cache() -> None:
    """Twice the L3 sysfs reports, not a fixed 64 MiB: a Xeon's 105 MB L3 timed every
    candidate from the cache (a review)."""
    l3 = native.last_level_cache_bytes()
    assert native.cold_bytes(l3) == lin.COLD_BYTES
    # counted up to L3_COUNTED_MAX: a VM gives its host socket's L3 (480 MiB, Intel Xeon)
    assert native.cold_bytes(32 << 20) == 64 << 20
    assert native.cold_bytes(480 << 20) == 2 * native.L3_COUNTED_MAX == 128 << 20
    assert native.cold_bytes(None) == 64 << 20
    if Path("/sys/devices/system/cpu/cpu0/cache/index3/size").is_file():
        assert l3 is not None and l3 >= 1 << 20


def expected_copies(size: int) -> int:
    """Copies of a weight of `size` bytes that reach COLD_BYTES, within the cap: on the
    Intel Xeon VM, whose sysfs gives the host's 480 MiB L3, a 6 MiB weight would need 160
    and gets MAX_COPIES."""
    return min(lin.MAX_COPIES, -(-lin.COLD_BYTES // size))


def test_candidates_are_timed_on_weights_read_from_memory() -> None:
    """Each timed product reads another copy, together past the last-level cache: timed
    on one hot copy, a bf16 matrix that fit in the L3 picked the kernel slower from
    memory. The copies equal the weight and share none of its memory."""
    small = torch.randn(512, 512)  # 1 MiB: 64 copies on a 32 MiB L3
    copies = lin.cold_copies(small)
    assert len(copies) == min(lin.MAX_COPIES, lin.COLD_BYTES // (1 << 20))
    assert len(lin.cold_copies(torch.randn(8, 8))) == lin.MAX_COPIES  # the cap
    assert len({c.data_ptr() for c in copies}) == len(copies)  # type: ignore[union-attr]
    assert all(torch.equal(c, small) for c in copies)  # type: ignore[arg-type]
    large = torch.randn(40 << 18)  # 40 MiB: 2 copies reach COLD_BYTES on a 32 MiB L3
    assert len(lin.cold_copies(large)) == expected_copies(40 << 20)
    if native.available():
        blocked = native.block(torch.randn(2048, 768))
        twins = lin.cold_copies(blocked)
        assert len(twins) == expected_copies(2048 * 768 * 4)  # 6 MiB each: 11 on 32 MiB
        for twin in twins[1:]:
            assert isinstance(twin, native.BlockedWeight)
            assert torch.equal(twin.blocks, blocked.blocks)
            assert twin.blocks.data_ptr() % native.HUGE_PAGE == 0  # timed as it is used


def test_timing_a_weights_candidates_holds_a_bounded_few_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All candidates' copies are alive together while they are timed: on a VM whose
    sysfs gives the host's 480 MiB L3, one 9 MiB weight held 2.9 GB more (a review). At
    most twice L3_COUNTED_MAX a candidate now, whatever the L3 says."""
    made: list[int] = []
    real = lin.cold_copies

    def counted(weight: lin.Weight) -> list[lin.Weight]:
        copies = real(weight)
        made.append(sum(lin.weight_bytes(c) for c in copies[1:]))
        return copies

    monkeypatch.setattr(lin, "cold_copies", counted)
    monkeypatch.setattr(lin, "_CHOSEN", {})
    lin.prepare(torch.randn(3072, 768), FP32)
    assert len(made) >= 2 and all(m <= 2 * native.L3_COUNTED_MAX for m in made), made
