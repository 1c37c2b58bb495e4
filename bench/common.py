"""Helpers shared by the benchmark scripts: summary statistics and the demo model."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from butterfly.runtime.demo import demo_at
from butterfly.runtime.linear import Int8Weight
from butterfly.runtime.native import BlockedWeight

T = TypeVar("T")
K = TypeVar("K")


def summary(samples: list[float]) -> dict[str, Any]:
    """Median with spread (p10, p90, min, max), in the unit of the samples."""
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {
        "median": round(statistics.median(s), 4),
        "p10": round(pct(0.1), 4),
        "p90": round(pct(0.9), 4),
        "min": round(s[0], 4),
        "max": round(s[-1], 4),
        "n": len(s),
    }


def rotated(items: Iterable[K], r: int) -> list[K]:
    """`items` starting at the `r`-th (mod their count): each round of a benchmark runs
    its contenders in another order, so no contender always runs first (after the
    previous round's last) or right after the same one."""
    seq = list(items)
    k = r % len(seq) if seq else 0
    return seq[k:] + seq[:k]


def bench_model(size: str) -> Path:
    """The demo model of `size`, created once under bench/out/ (never downloaded)."""
    return demo_at(Path(__file__).resolve().parent / "out" / "models" / f"demo-{size}", size)


VECTOR_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


def cpu() -> dict[str, Any]:
    """The CPU model and its vector extensions: figures differ between an AMD EPYC and an
    Intel Xeon with AVX-512 and AMX (the machine's CPU changes between sessions). A VM
    may name only the vendor's line ("AMD EPYC"), so the family, model and stepping
    numbers and the last-level cache say which part it is (Zen 4 and Zen 5 both call
    themselves that here)."""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return {
        "cpu_model": fields.get("model name", "unknown"),
        "cpu_family_model_stepping": [fields.get(k) for k in ("cpu family", "model", "stepping")],
        "l3_bytes": l3_bytes(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
    }


def l3_bytes() -> int | None:
    """The last-level cache of CPU 0, from sysfs (None where it does not say)."""
    from butterfly.runtime.native import last_level_cache_bytes

    return last_level_cache_bytes()


def weight_views(weights: Iterable[object]) -> list[torch.Tensor]:
    """The bytes of each weight a decode step streams, as flat int32 views of the same
    memory (no copy): a blocked weight's blocks, an int8 weight's bytes, a plain tensor.
    A layout whose bytes cannot be viewed (oneDNN's packed tensors) is left out, so the
    probe reads the rest of the same allocations. Where every weight is packed (bf16 on
    the Intel Xeon with AMX, whose load-time timing chose oneDNN for every shape), the
    probe reads stand-ins of the same sizes (`probe_memory` says which): the products'
    own reading (`products_chain`), of the weights themselves, still raises the floor
    where the stand-ins read slower."""
    from butterfly.runtime.linear import weight_bytes

    held = list(weights)
    views = [v for v in map(_view, held) if v is not None]
    if views:
        return views
    if not held:
        raise ValueError("no weights: nothing to probe")
    return [torch.ones(weight_bytes(w) // 4, dtype=torch.int32) for w in held]  # type: ignore[arg-type]


def probe_memory(weights: Iterable[object]) -> str:
    """What `weight_views` reads for `weights`: "own" (their memory) or "stand-in"."""
    return "own" if any(_view(w) is not None for w in weights) else "stand-in"


def _view(w: object) -> torch.Tensor | None:
    t = w.blocks if isinstance(w, BlockedWeight) else w.q if isinstance(w, Int8Weight) else w
    if not (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.is_contiguous()):
        return None
    flat = t.reshape(-1).view(torch.uint8)
    return flat[: flat.numel() // 4 * 4].view(torch.int32)


def stage_matrices(stage: Any) -> list[object]:
    """A Llama stage's matrices, the head included: what its decode step streams."""
    held = [m for b in stage.blocks for m in (b.wqkv, b.wo, b.w13, b.w2)]
    return held if stage.head is None else [*held, stage.head]


def _call_cost() -> float:
    """Seconds of one reduction's fixed cost (the call, the thread team), from a 256 KiB
    reduction hot in the cache: 5.9 µs on the AMD EPYC, where a loop over 48 distinct
    128 KiB reductions took 7.8 µs each, data included, so the subtraction is about the
    cost a loop over weights pays per call."""
    hot = torch.zeros(1 << 16, dtype=torch.int32)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        hot.amax()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth_samples(views: list[torch.Tensor], rounds: int = 2) -> list[float]:
    """The read bandwidth of the weights' own memory on torch's threads, GB/s, one sample
    per pass over every view (`weight_views`).

    Why the weights and not a buffer of the probe's own: on this machine the same 512 MB
    sum read 27-35 GB/s in some processes and 55-66 GB/s in others (AMD EPYC VM,
    2026-12-05), depending on the memory an allocation was given (one allocation's
    first pass after 2 GB were freed read 9 GB/s). A buffer of its own measured memory
    the decode never reads, which is how fp32 decode came out at 0.95x its "floor"."""
    cost = _call_cost()
    nbytes = sum(v.numel() * 4 for v in views)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for v in views:
            v.amax()
        elapsed = time.perf_counter() - t0 - cost * len(views)
        rates.append(nbytes / max(elapsed, 1e-9) / 1e9)
    return rates


def products_chain(stage: Any) -> tuple[Callable[[], float], int, list[str]]:
    """A decode step's matrix products alone: one row through each of the stage's
    matrices in turn, the bytes they read, and the matrices not on the compiled blocked
    kernels (such as a small head on torch's int8 product, or every matrix where the
    load-time timing chose oneDNN's packed layout, as for bf16 on the Intel Xeon with
    AMX). The blocked ones run on the compiled kernels directly (no torch around a call);
    the others through `butterfly.runtime.linear.linear`, as a decode step runs them.
    The returned function runs the chain once and gives its seconds, less each compiled
    call's own fixed cost (a thread team's start and end, measured on a 16 x 64 fp32
    matrix hot in the cache; the int8 product's own scratch and quantizing of the row, a
    microsecond or two, stay in; a torch call's cost stays in whole), so what is left is
    mostly the products' streaming: against the floor, how much of a decode's excess the
    kernels are, and how much the rest of the step (attention and its cache, norms, the
    threads' meetings, the step's Python)."""
    from butterfly.runtime import native
    from butterfly.runtime.linear import linear, weight_bytes

    kernels = native._kernels()  # the products without the tensors blocked_linear builds
    calls: list[tuple[Any, tuple[int, ...], tuple[torch.Tensor, ...]]] = []
    through_torch: list[tuple[torch.Tensor, Any]] = []
    nbytes = 0
    other_kernel: list[str] = []
    for m in stage_matrices(stage):
        if not isinstance(m, BlockedWeight) or m.blocks.dtype not in kernels:
            kernel = getattr(m, "kernel", "mkldnn" if getattr(m, "is_mkldnn", False) else "torch")
            other_kernel.append(f"{tuple(getattr(m, 'shape', ()))} {kernel}")
            width = int(m.shape[1])  # type: ignore[union-attr]
            through_torch.append((torch.randn(1, width).to(_row_dtype(m)), m))
            nbytes += weight_bytes(m)
            continue
        nblocks, width = int(m.blocks.shape[0]), int(m.blocks.shape[1])
        x, y = torch.randn(1, width), torch.empty(1, nblocks * native.BLOCK)
        args = (x.data_ptr(), 1, width, m.blocks.data_ptr(), nblocks, y.data_ptr())
        calls.append((kernels[m.blocks.dtype], args, (x, y, m.blocks)))
        nbytes += m.blocks.numel() * m.blocks.element_size()
    if not calls and not through_torch:
        raise ValueError("the stage has no matrix: nothing to time")
    per_call = _hot_call_cost(kernels) if calls else 0.0

    def run() -> float:
        t0 = time.perf_counter()
        for kernel, args, _ in calls:
            kernel(*args)
        with torch.inference_mode():
            for x, m in through_torch:
                linear(x, m)
        return time.perf_counter() - t0 - per_call * len(calls)

    return run, nbytes, other_kernel


def _row_dtype(m: object) -> torch.dtype:
    """The dtype of the activations a matrix takes in a decode step: its own for a plain
    or packed tensor, its scales' (the compute dtype) for an int8 one."""
    if isinstance(m, Int8Weight):
        return m.scales.dtype
    dtype = getattr(m, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _hot_call_cost(kernels: dict[torch.dtype, Any]) -> float:
    """Seconds of one compiled product's fixed cost, from a 16 x 64 fp32 matrix hot in
    the cache."""
    from butterfly.runtime import native

    if torch.float32 not in kernels:
        raise ValueError("no compiled fp32 kernel to time a call's fixed cost on")
    hot = native.block(torch.randn(16, 64))
    hx, hy = torch.randn(1, 64), torch.empty(1, native.BLOCK)
    hot_kernel, hot_args = kernels[torch.float32], (hx.data_ptr(), 1, 64, hot.blocks.data_ptr())
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        hot_kernel(*hot_args, 1, hy.data_ptr())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor_ms(weight_bytes: int, samples: list[float]) -> float:
    """The memory-bandwidth floor of a decode step: the bytes of weights it reads over the
    *highest* read bandwidth in `samples`. A floor is a time no kernel can beat."""
    return weight_bytes / (max(samples) * 1e9) * 1000  # unrounded: a tiny model's is 0.0


def beside_bandwidth(run: Callable[[], T], views: list[torch.Tensor]) -> tuple[T, list[float]]:
    """`run()`, and samples of its weights' read bandwidth (`views`) taken just before and
    just after it, so a decode is held to what its memory did while it ran."""
    before = read_bandwidth_samples(views)
    out = run()
    return out, before + read_bandwidth_samples(views)


def truncated_draft(model_dir: Path, layers: int) -> Path:
    """A draft model for speculative decoding made of `model_dir`'s first `layers` layers,
    its final norm and head (a self-speculative draft, as LayerSkip drafts from early
    layers), written once beside it. The demo models are seeded noise, so no separately
    trained small model shares their behaviour; their own early layers partly do."""
    from safetensors.torch import load_file, save_file

    out = model_dir.parent / f"{model_dir.name}-draft-{layers}"
    if (out / "config.json").is_file():
        return out
    config = json.loads((model_dir / "config.json").read_text())
    if not 0 < layers <= config["num_hidden_layers"]:
        raise ValueError(f"a draft of {layers} layers from {config['num_hidden_layers']}")
    kept: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers:
                kept[name] = tensor
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(kept, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / extra, tmp / extra)
    tmp.rename(out)
    return out


def decode_bytes(stage: Any) -> int:
    """Bytes one decode step of a Llama stage reads: every weight it holds but the
    embedding table, of which a step reads one row (unless it is also the head)."""
    from butterfly.runtime.llama_load import stage_bytes

    held = stage_bytes(stage)
    if stage.embed is not None and stage.head is not stage.embed:
        held -= stage.embed.numel() * stage.embed.element_size()
    return held


def kv_read_bytes(stage: Any, prompt: int, new: int) -> int:
    """Bytes of KV cache one decode step of `stage` reads, on average over the `new` - 1
    steps after a `prompt`-token prefill: every earlier position's keys and values, in
    every layer. The issue's floor counts weights only; this says how much of a decode's
    excess over it is the cache (at 160 positions of the small model, 11.25 MiB in fp32:
    a tenth of the int8 weights' bytes)."""
    cache = stage.new_cache()
    if cache is None:
        return 0
    per_position = 2 * cache.num_layers * cache.kv_heads * cache.head_dim * cache.dtype.itemsize
    return int(per_position * (prompt + new / 2))


def machine() -> dict[str, Any]:
    """The CPU and software a figure was measured on, and the load when it was written
    (1, 5 and 15 minutes): a figure's "quiet" or "loaded" must be checkable in its JSON."""
    return {
        **cpu(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
    }
