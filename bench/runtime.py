"""Runtime benchmark: the small demo model unsplit in transformers vs Butterfly stages.

Prints one JSON object. Each round runs every contender once (prefill of 128 tokens, then
64 greedy decode steps), so slow drift of this shared machine hits all of them alike;
medians and spread are over all rounds. Peak memory is measured in fresh processes.
Beside each decode figure, its memory-bandwidth floor: the bytes of weights one decode
step reads over the highest read bandwidth of those weights' own memory, the time no
kernel can beat (`common.read_bandwidth_samples` says why their own). `decode_to_floor` is
how far above it each contender runs, per round, against the bandwidth sampled just before
and after that contender's turn (`common.beside_bandwidth`); `bandwidth_floor_ms` is the
floor at the contender's highest sample in the run. `decode_to_floor_with_kv_cache` adds
the KV cache's bytes a step reads (`common.kv_read_bytes`), which the issue's floor leaves out.
`butterfly_1_stage_torch_ops` is the same stage without its compiled layers
(runtime/fused_layers.py), so the two differ in that alone.

    python bench/runtime.py [--rounds 5] [--size small]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from butterfly.partition.strategies import uniform_ranges
from butterfly.runtime import native
from butterfly.runtime.generate import run_pipeline
from butterfly.runtime.linear import kernel_choices
from butterfly.runtime.loader import load_stage, num_layers
from butterfly.runtime.stage import Stage
from common import (
    bench_model,
    beside_bandwidth,
    decode_bytes,
    floor_ms,
    kv_read_bytes,
    machine,
    probe_memory,
    rotated,
    stage_matrices,
    summary,
    weight_views,
)

PROMPT, NEW = 128, 64
Step = Callable[[torch.Tensor, int], torch.Tensor]  # (ids, start_pos) -> last logits


def transformers_model(model_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in model.parameters():  # out of the safetensors mmap, as Butterfly does
        p.data = p.data.clone()
    return model


def transformers_session(model_dir: Path, model: Any = None) -> Callable[[], Step]:
    from transformers import DynamicCache

    model = transformers_model(model_dir) if model is None else model

    def new() -> Step:
        cache = DynamicCache()

        def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[0, -1]

        return step

    return new


def butterfly_session(stages: list[Stage]) -> Callable[[], Step]:
    def new() -> Step:
        caches = [s.new_cache() for s in stages]

        def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
            return run_pipeline(stages, caches, ids, pos)[0, -1]

        return step

    return new


def torch_operations_only(stage: Stage) -> Stage:
    """The same stage and weights without the compiled layers (runtime/fused_layers.py):
    llama.py's torch operations, what the compiled call is measured against."""
    twin = copy.copy(stage)
    if hasattr(twin, "_fused"):
        twin._fused = None
    return twin


def one_round(
    new: Callable[[], Step], prompt: torch.Tensor
) -> tuple[float, list[float], list[int]]:
    step = new()
    with torch.inference_mode():
        t0 = time.perf_counter()
        token = int(step(prompt, 0).argmax())
        prefill = time.perf_counter() - t0
        decode, tokens = [], [token]
        for i in range(NEW - 1):
            t0 = time.perf_counter()
            token = int(step(torch.tensor([[token]]), PROMPT + i).argmax())
            decode.append(time.perf_counter() - t0)
            tokens.append(token)
    return prefill * 1000, [d * 1000 for d in decode], tokens


MEMORY_PROBE = """
import json, sys, torch
from pathlib import Path
from butterfly.runtime.loader import load_stage
from butterfly.runtime.weights import CheckpointReader
from butterfly.types.model import LayerRange
def status_mb(field):  # VmHWM is this process's peak; ru_maxrss can carry the parent's
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
base = status_mb('VmRSS')
reader = CheckpointReader(Path(sys.argv[1]))
stage = load_stage(Path(sys.argv[1]), LayerRange(int(sys.argv[2]), int(sys.argv[3])), reader=reader)
print(json.dumps({"weights_mb": reader.bytes_read / 2**20, "rss_mb": status_mb('VmRSS') - base,
                  "peak_rss_mb": status_mb('VmHWM') - base}))
"""


def memory(model_dir: Path, start: int, end: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(model_dir), str(start), str(end)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {k: round(v, 1) for k, v in json.loads(out.stdout).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    model_dir = bench_model(args.size)
    n = num_layers(model_dir)
    one = [load_stage(model_dir)]
    four = [load_stage(model_dir, r) for r in uniform_ranges(n, 4)]
    torch_ops = [torch_operations_only(s) for s in one]
    hf = transformers_model(model_dir)
    contenders = {
        "transformers": transformers_session(model_dir, hf),
        "butterfly_1_stage": butterfly_session(one),
        "butterfly_1_stage_torch_ops": butterfly_session(torch_ops),
        "butterfly_4_stages": butterfly_session(four),
    }
    weights = {  # bytes one decode step reads (transformers holds the same fp32 weights)
        "transformers": sum(decode_bytes(s) for s in one),
        "butterfly_1_stage": sum(decode_bytes(s) for s in one),
        "butterfly_1_stage_torch_ops": sum(decode_bytes(s) for s in one),
        "butterfly_4_stages": sum(decode_bytes(s) for s in four),
    }
    kv = kv_read_bytes(one[0], PROMPT, NEW)  # transformers' cache is fp32 too: the same bytes
    views = {  # the memory each contender's decode streams, for its floor
        "transformers": weight_views(
            m.weight for m in hf.modules() if isinstance(m, torch.nn.Linear)
        ),
        "butterfly_1_stage": weight_views(stage_matrices(one[0])),
        "butterfly_1_stage_torch_ops": weight_views(stage_matrices(one[0])),
        "butterfly_4_stages": weight_views([m for s in four for m in stage_matrices(s)]),
    }
    # "stand-in" where every weight was packed (oneDNN): the probe read buffers of their sizes
    probed = {
        "transformers": "own",
        "butterfly_1_stage": probe_memory(stage_matrices(one[0])),
        "butterfly_1_stage_torch_ops": probe_memory(stage_matrices(one[0])),
        "butterfly_4_stages": probe_memory([m for s in four for m in stage_matrices(s)]),
    }
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    prefill: dict[str, list[float]] = {k: [] for k in contenders}
    decode: dict[str, list[float]] = {k: [] for k in contenders}
    tokens: dict[str, list[int]] = {}
    for new in contenders.values():  # warm-up
        one_round(new, prompt)
    bandwidth: dict[str, list[float]] = {k: [] for k in contenders}
    to_floor: dict[str, list[float]] = {k: [] for k in contenders}
    to_floor_kv: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        for name in rotated(contenders, r):
            run = functools.partial(one_round, contenders[name], prompt)
            (p, d, toks), samples = beside_bandwidth(run, views[name])
            prefill[name].append(p)
            decode[name].extend(d)
            tokens[name] = toks
            bandwidth[name] += samples
            to_floor[name].append(summary(d)["median"] / floor_ms(weights[name], samples))
            to_floor_kv[name].append(summary(d)["median"] / floor_ms(weights[name] + kv, samples))
    floor = {k: round(floor_ms(b, bandwidth[k]), 3) for k, b in weights.items()}
    ref_prefill = summary(prefill["transformers"])["median"]
    ref_decode = summary(decode["transformers"])["median"]
    quarter = n // 4
    whole = memory(model_dir, 0, n)
    middle = memory(model_dir, quarter, 2 * quarter)
    first = memory(model_dir, 0, quarter)
    result = {
        "benchmark": "runtime",
        "model": f"demo-{args.size}",
        "layers": n,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "rounds": args.rounds,
        "machine": machine(),
        "prefill_ms": {k: summary(v) for k, v in prefill.items()},
        "decode_ms_per_token": {k: summary(v) for k, v in decode.items()},
        "read_bandwidth_gbs": {k: summary(v) for k, v in bandwidth.items()},
        "floor_bandwidth_gbs": {k: round(max(v), 2) for k, v in bandwidth.items()},
        "probe_memory": probed,
        "decode_weights_mb": {k: round(b / 2**20, 1) for k, b in weights.items()},
        "bandwidth_floor_ms": floor,
        "decode_to_floor": {k: summary(v) for k, v in to_floor.items()},
        "kv_cache_read_mb_per_step": round(kv / 2**20, 2),
        "decode_to_floor_with_kv_cache": {k: summary(v) for k, v in to_floor_kv.items()},
        "kernels": [dataclasses.asdict(c) for c in kernel_choices()],
        "kernel_stream": dataclasses.asdict(stream) if (stream := native.stream_choice()) else None,
        "ratio_to_transformers": {
            k: {
                "prefill": round(summary(prefill[k])["median"] / ref_prefill, 3),
                "decode": round(summary(decode[k])["median"] / ref_decode, 3),
            }
            for k in contenders
        },
        "same_greedy_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        "memory": {
            "whole_model": whole,
            f"middle_quarter_[{quarter},{2 * quarter})": middle,
            f"first_quarter_[0,{quarter})": first,
            "middle_quarter_weight_ratio": round(middle["weights_mb"] / whole["weights_mb"], 3),
            "middle_quarter_rss_ratio": round(middle["rss_mb"] / whole["rss_mb"], 3),
            "first_quarter_rss_ratio": round(first["rss_mb"] / whole["rss_mb"], 3),
            "middle_quarter_peak_rss_ratio": round(middle["peak_rss_mb"] / whole["peak_rss_mb"], 3),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
