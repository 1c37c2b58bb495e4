"""The blocked fp32 kernel: built on this machine, equal to F.linear, and absent (not
broken) where it cannot be built."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from butterfly.runtime import linear as lin
from butterfly.runtime import native, native_build
from butterfly.runtime.precision import FP32, Precision

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@needs_compiler
def test_built_and_offered_for_fp32_bf16_and_int8_weights() -> None:
    assert native.available()
    assert "blocked" in lin.candidates(FP32)
    assert "blocked" in lin.candidates(Precision(torch.bfloat16))
    assert "blocked" not in lin.candidates(Precision(torch.float16))
    assert "blocked" in lin.candidates(Precision(torch.float32, "int8"))
    assert "blocked" in lin.candidates(Precision(torch.bfloat16, "int8"))


@needs_compiler
@pytest.mark.parametrize("out_features", [16, 259, 1000])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 130])
def test_equals_f_linear_for_any_rows_and_padded_outputs(out_features: int, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, 96, generator=g)
    x = torch.randn(2, rows, 96, generator=g)
    blocked = native.block(w)
    assert blocked.shape == (out_features, 96) and blocked.blocks.shape[2] == native.BLOCK
    got = native.blocked_linear(x, blocked)
    assert got.shape == (2, rows, out_features)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_same_product_on_any_thread_count(threads: int) -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(512, 256, generator=g), torch.randn(1, 256, generator=g)
    blocked = native.block(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.blocked_linear(x, blocked)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_compiler
def test_refuses_what_it_cannot_compute() -> None:
    blocked = native.block(torch.randn(32, 64))
    with pytest.raises(ValueError, match="blocked product"):
        native.blocked_linear(torch.randn(1, 64, dtype=torch.bfloat16), blocked)
    with pytest.raises(ValueError, match="blocked product"):
        native.blocked_linear(torch.randn(1, 63), blocked)


def test_no_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_build.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_build.build()


@needs_compiler
def test_a_new_cpu_builds_its_own_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The library is compiled with -march=native, so one built on another CPU (the
    machine's CPU changes between sessions) must not be loaded here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native_build.build()
    assert first.is_file() and native_build.build() == first  # built once, then found
    monkeypatch.setattr(native_build, "cpu_flags", lambda: "flags : some other cpu")
    other = native_build.build()
    assert other != first and other.is_file()
    assert not [p for p in other.parent.iterdir() if p.suffix == ".o" or p.name.startswith("tmp")]


@needs_compiler
def test_a_directory_others_may_write_to_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A library found there is loaded into the node: anyone who can write there could
    put code in every node process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "butterfly" / "kernels").mkdir(parents=True)
    (tmp_path / "cache" / "butterfly" / "kernels").chmod(0o777)
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    used = native_build.cache_dir()
    assert used == tmp_path / "tmp" / f"butterfly-kernels-{os.getuid()}"
    assert used.stat().st_mode & 0o777 == 0o700


def huge_kb_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_a_large_blocked_weight_starts_on_a_huge_page_and_gets_them() -> None:
    w = torch.randn(2048, 768)
    blocked = native.block(w)
    start = blocked.blocks.data_ptr()
    assert start % native.HUGE_PAGE == 0
    torch.testing.assert_close(blocked.blocks[3, :, 5], w[3 * 16 + 5])  # the layout holds
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():
        assert huge_kb_at(start) >= 2048, "the kernel grants huge pages, the weight has none"
    small = native.empty_on_huge_pages((16, 16))  # under one huge page: ordinary memory
    assert small.shape == (16, 16) and small.dtype == torch.float32


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_bf16_weights_equal_torchs_bf16_product(rows: int) -> None:
    """Summed in fp32 and rounded once, bias included: as torch's bf16 F.linear, to within
    one bf16 rounding of the output."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 96, generator=g).to(torch.bfloat16)
    bias = torch.randn(100, generator=g).to(torch.bfloat16)
    x = torch.randn(2, rows, 96, generator=g).to(torch.bfloat16)
    blocked = native.block(w)
    assert blocked.dtype == torch.bfloat16
    got = native.blocked_linear(x, blocked, bias)
    assert got.dtype == torch.bfloat16
    exact = F.linear(x.float(), w.float(), bias.float())
    torch.testing.assert_close(got.float(), exact, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1.6e-2, atol=1.6e-2)


@needs_compiler
def test_a_padded_blocked_weight_counts_its_rows_not_its_padding() -> None:
    """Placement and validation count [out, in] (layer_infos); the zeros padding the
    last block of 16 are not the model's bytes."""
    for weight in (torch.randn(100, 96), torch.randn(100, 96).bfloat16()):
        blocked = native.block(weight)
        assert blocked.blocks.shape[0] * native.BLOCK == 112
        assert lin.weight_bytes(blocked) == 100 * 96 * weight.element_size()


def _has_vnni() -> bool:
    flags = native_build.cpu_flags().split()  # what the library's build is keyed by
    return "avx512_vnni" in flags and "avx512bw" in flags


@needs_compiler
@pytest.mark.parametrize("width", [96, 95])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 130])
def test_int8_weights_equal_their_dequantized_product_grouped_or_widened(
    width: int, rows: int
) -> None:
    """Width 96 takes the VNNI product where the CPU has it (x split into three byte
    passes, weights four positions side by side), 95 the widened one: both are the fp32
    product of the dequantized weights, an outlier in x included (the passes' scale is
    the row's largest value, so the small values ride on the later passes)."""
    g = torch.Generator().manual_seed(rows * width)
    q = torch.randint(-127, 128, (100, width), generator=g, dtype=torch.int8)
    scales = torch.rand(100, generator=g) * 0.02
    x = torch.randn(2, rows, width, generator=g)
    x[..., 3] = 300.0
    blocked = native.block_int8(q, scales)
    assert blocked.group == (4 if width % 4 == 0 and _has_vnni() else 1)
    dense = q.float() * scales[:, None]
    torch.testing.assert_close(blocked.dense(), dense, rtol=0, atol=0)  # the layout holds
    got = native.blocked_linear(x, blocked)
    want = F.linear(x.double(), dense.double()).float()
    scale = float(want.abs().max())  # fp32 sums of 96 terms: a few ulps of the largest
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)


@needs_compiler
def test_an_int8_product_of_a_row_holding_nan_or_inf_is_nan_in_that_row_only() -> None:
    q = torch.randint(-127, 128, (32, 64), generator=torch.Generator().manual_seed(0)).to(
        torch.int8
    )
    x = torch.randn(3, 64)
    x[0, 7], x[2, 9] = float("nan"), float("inf")
    got = native.blocked_linear(x, native.block_int8(q, torch.ones(32)))
    assert got[0].isnan().all() and not got[1].isnan().any() and not got[2].isfinite().any()
    torch.testing.assert_close(got[1], F.linear(x[1], q.float()), rtol=1e-5, atol=1e-3)


def test_the_cache_sparing_build_is_kept_unless_another_streams_clearly_faster() -> None:
    assert native_build.choose_stream({"nta": 15.2, "t2": 27.0}) == "t2"  # the Intel Xeon's
    assert native_build.choose_stream({"nta": 30.0, "t2": 31.0}) == "nta"  # within the margin
    assert native_build.choose_stream({"nta": 30.0, "t2": 20.0}) == "nta"
    assert native_build.choose_stream({"t2": 5.0}) == "t2"


def test_only_a_clear_timing_is_kept_for_later_processes() -> None:
    """One near the margin, which a loaded moment can tip either way, is not."""
    assert native_build.decisive({"nta": 12.8, "t2": 23.4})  # the Intel Xeon's
    assert native_build.decisive({"nta": 30.0, "t2": 31.0})  # a tie: the cache-sparing one
    assert native_build.decisive({"nta": 30.0, "t2": 20.0})
    assert not native_build.decisive({"nta": 30.0, "t2": 36.0})  # past the margin, not clearly
    assert not native_build.decisive({"nta": 30.0, "t2": 33.0})


@needs_compiler
@pytest.mark.parametrize("stream", sorted(native_build.STREAMS))
def test_every_build_computes_the_same_products(stream: str) -> None:
    """Which build a process keeps depends on the CPU it runs on, so each must be right
    on any: its fp32, bf16 and int8 products against F.linear."""
    lib = ctypes.CDLL(str(native_build.build(native_build.STREAMS[stream])))
    for dtype in native.SYMBOLS:
        assert native._agrees(native._declared(lib, dtype), dtype), (stream, dtype)


@needs_compiler
@pytest.mark.parametrize("faster", sorted(native_build.STREAMS))
def test_the_process_runs_the_build_its_timing_chose(
    monkeypatch: pytest.MonkeyPatch, faster: str
) -> None:
    timed: list[set[str]] = []

    def rates(built: dict[str, ctypes.CDLL]) -> dict[str, float]:
        timed.append(set(built))
        return {name: 100.0 if name == faster else 10.0 for name in built}

    remembered: list[dict[str, float]] = []
    monkeypatch.setattr(native, "_stream_rates", rates)
    monkeypatch.setattr(native_build, "remembered", lambda _record, _names: None)
    monkeypatch.setattr(native_build, "remember", lambda _record, gbs: remembered.append(gbs))
    native._chosen.cache_clear()  # the process's choice is made again by the next user
    native._kernels.cache_clear()
    try:
        choice = native.stream_choice()
        lib = native.library()
        assert choice is not None and choice.name == faster and timed == [set(native_build.STREAMS)]
        assert remembered == [choice.gbs] and not choice.remembered
        assert lib is not None and lib._name == str(
            native_build.build(native_build.STREAMS[faster])
        )
        w, x = torch.randn(40, 64), torch.randn(2, 64)
        torch.testing.assert_close(native.blocked_linear(x, native.block(w)), F.linear(x, w))
    finally:
        native._chosen.cache_clear()
        native._kernels.cache_clear()


@needs_compiler
def test_the_load_time_timing_reads_every_build() -> None:
    rates = native._stream_rates(
        {
            name: ctypes.CDLL(str(native_build.build(flags)))
            for name, flags in native_build.STREAMS.items()
        }
    )
    assert set(rates) == set(native_build.STREAMS) and all(r > 0.1 for r in rates.values())


@needs_compiler
def test_a_remembered_timing_is_not_timed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which prefetch streams faster is the CPU's: a later process takes the record."""

    def rates(_built: object) -> dict[str, float]:
        raise AssertionError("timed again")

    record = {name: 100.0 if name == "t2" else 10.0 for name in native_build.STREAMS}
    monkeypatch.setattr(native, "_stream_rates", rates)
    monkeypatch.setattr(native_build, "remembered", lambda _record, _names: record)
    native._chosen.cache_clear()
    native._kernels.cache_clear()
    try:
        choice = native.stream_choice()
        assert choice is not None and choice.name == "t2" and choice.gbs == record
        assert choice.remembered
    finally:
        native._chosen.cache_clear()
        native._kernels.cache_clear()


def test_a_record_is_read_back_and_a_foreign_or_broken_one_is_not(tmp_path: Path) -> None:
    record = tmp_path / "stream-x.json"
    native_build.remember(record, {"nta": 12.5, "t2": 24.0})
    assert native_build.remembered(record, {"nta", "t2"}) == {"nta": 12.5, "t2": 24.0}
    assert native_build.remembered(record, {"nta", "t3"}) is None  # other builds
    for text in ("{", "[1, 2]", '{"nta": "fast", "t2": 24.0}', '{"nta": -1.0, "t2": 24.0}'):
        record.write_text(text)
        assert native_build.remembered(record, {"nta", "t2"}) is None, text
    assert native_build.remembered(tmp_path / "absent.json", {"nta", "t2"}) is None
    assert [p.name for p in tmp_path.iterdir()] == ["stream-x.json"]  # no temporary left
