"""Speculative decoding benchmark: traversals per token and tokens/s, on and off, 4 nodes.

Prints one JSON object. A cluster of `--nodes` node processes (the small demo model, one
stage each, verification none; with `--verification audit`, f = 1, each range on two
nodes and every answer audited, which it must pass: speculation runs for audited requests
too) serves every request; each round sends every workload's request twice, with
generation.speculative off and on (switched through the config API; the order alternates
between rounds), so the ratio of each pair compares the same processes on the same machine state.

Workloads. The demo model's weights are seeded noise: it cannot copy a prompt the way a
trained model edits code, but its greedy output falls into loops that repeat its own
earlier text, which is the same regime for prompt lookup (the draft is what followed the
last tokens before). `repetitive`: greedy continuations of a code prompt and a story
prompt. `non_repetitive`: the same prompts sampled at temperature 1, where the text does
not repeat and nearly every draft is rejected (what drafting costs when it does not pay).

`--mode draft` drafts with a small model on the gateway instead (`--draft-model`: a
checkpoint directory, `self` for the served model itself, or `layers:N` for its first N
layers, `common.truncated_draft`). The demo model being noise, no separately made small
model predicts it: `self` agrees with every greedy token (the mechanism's ceiling, drafting
costing a whole model's decode per token on the gateway) and `layers:2` with almost none
(what a draft model that does not fit costs).

`--link-latency-ms N` puts a delaying proxy in front of every node
(`butterfly.testing.latency`, from the latency-harness branch); when that module is not
installed the run goes on without added latency and says so (`link_latency_ms` 0,
`latency_harness` "unavailable").

    python bench/speculative.py [--rounds 5] [--nodes 4] [--k 4] [--link-latency-ms 5]
        [--mode ngram|draft] [--draft-model self|layers:N|DIR] [--verification none|audit]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from butterfly.runtime.tokenizer import TextCodec
from common import bench_model, machine, summary, truncated_draft

NEW = 64
# verification none unless --verification audit. The failure detector
# forgives pauses of up to 5 s: on this shared 2-core machine (load averages of 15-20
# while other work runs) heartbeats stall for seconds, and a node declared failed
# mid-run re-plans the cluster, which is not what this measures.
SETTINGS = {"byzantine.verification": "none", "coordination.acceptable_pause_ms": 5000.0}
PROMPTS = {
    "code": (
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
        "# the same, renamed:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
    ),
    "story": "The quick brown fox jumps over the lazy dog while the cat watches from a window.",
}


def set_config(url: str, body: dict[str, Any]) -> None:
    r = httpx.post(f"{url}/api/v1/config", json=body, timeout=60, follow_redirects=True)
    if r.status_code == 409 and "already in force" in r.text:
        return  # already so
    if r.status_code >= 400:
        raise RuntimeError(f"config update {body} refused: {r.status_code} {r.text}")


def infer(
    url: str, prompt: list[int], temperature: float, seed: int, verification: str = "none"
) -> dict[str, Any]:
    body = {
        "input_ids": prompt,
        "max_new_tokens": NEW,
        "temperature": temperature,
        "seed": seed,
        "wait": True,
    }
    r = httpx.post(f"{url}/inference", json=body, timeout=600, follow_redirects=True)
    if r.status_code != 200:
        raise RuntimeError(f"request failed: {r.status_code} {r.text[:2000]}")
    res = r.json()
    t = res["timings"]
    if verification != "none" and res["verified"] != verification:
        raise RuntimeError(f"an answer came back verified {res['verified']!r}: {res}")
    tokens = len(res["output_ids"])
    return {
        "tokens": tokens,
        # decode rate: the first token comes from the prefill, the same either way
        "tokens_per_s": (tokens - 1) / (t["total_s"] - t["time_to_first_token_s"]),
        "traversals_per_token": t["traversals"] / tokens,
        "output_ids": res["output_ids"],
    }


def latency_proxies(configs: list[Path], ms: float) -> tuple[Any, str]:
    if ms <= 0:
        return None, "off"
    try:
        latency = importlib.import_module("butterfly.testing.latency")
    except ImportError:
        return None, "unavailable"
    return latency.delay_cluster(configs, ms / 1000), "butterfly.testing.latency"


def draft_model(model_dir: Path, which: str) -> Path:
    """`--draft-model`: `self`, `layers:N`, or a checkpoint directory."""
    if which == "self":
        return model_dir
    if which.startswith("layers:"):
        return truncated_draft(model_dir, int(which.removeprefix("layers:")))
    return Path(which)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--size", default="small")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--link-latency-ms", type=float, default=5.0)
    ap.add_argument("--mode", choices=["ngram", "draft"], default="ngram")
    ap.add_argument("--draft-model", default="self")
    ap.add_argument("--verification", choices=["none", "audit"], default="none")
    args = ap.parse_args()
    model_dir = bench_model(args.size)
    on_mode = args.mode
    settings = {**SETTINGS, "byzantine.verification": args.verification}
    if on_mode == "draft":
        draft_dir = draft_model(model_dir, args.draft_model)
        settings["generation.speculative.draft_model"] = str(draft_dir)
    codec = TextCodec.load(model_dir)
    prompts = {name: codec.encode(text) for name, text in PROMPTS.items()}
    workloads = {"repetitive": 0.0, "non_repetitive": 1.0}  # temperature
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {"off": [], on_mode: []} for w in workloads
    }
    with tempfile.TemporaryDirectory() as tmp:
        port = free_ports(1)[0]
        cfgs = node_configs(
            nodes=args.nodes,
            f=0 if args.verification == "none" else 1,
            model=model_dir,
            api_port=port,
            data_dir=Path(tmp),
            settings=settings,
        )
        proxies, harness = latency_proxies(cfgs, args.link_latency_ms)
        cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", Path(tmp))
        try:
            cluster.start()
            cluster.wait_ready(300)
            url = cluster.api_url
            infer(url, prompts["story"], 0.0, 0)  # warm-up
            set_config(url, {"generation.speculative.k": args.k})
            load_before = os.getloadavg()[0]
            for i in range(args.rounds):
                modes = ["off", on_mode] if i % 2 == 0 else [on_mode, "off"]
                for mode in modes:
                    set_config(url, {"generation.speculative.mode": mode})
                    for workload, temperature in workloads.items():
                        for name, prompt in prompts.items():
                            seed = 1000 * i + len(name)
                            run = infer(url, prompt, temperature, seed, args.verification)
                            run["prompt"], run["round"] = name, i
                            samples[workload][mode].append(run)
            load_after = os.getloadavg()[0]
        finally:
            cluster.stop()
            if proxies is not None:
                proxies.close()
    result: dict[str, Any] = {
        "benchmark": "speculative",
        "model": f"demo-{args.size}",
        "nodes": args.nodes,
        "k": args.k,
        "new_tokens": NEW,
        "rounds": args.rounds,
        "link_latency_ms": args.link_latency_ms if harness != "unavailable" else 0.0,
        "latency_harness": harness,
        "mode": on_mode,
        "verification": args.verification,  # every answer passed it (else the run stops)
        "draft_model": args.draft_model if on_mode == "draft" else None,
        "settings": settings,
        "machine": machine(),
        # other work on the machine: 1-minute load average before and after the rounds
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "workloads": {},
    }
    for workload, by_mode in samples.items():
        off, on = by_mode["off"], by_mode[on_mode]
        entry: dict[str, Any] = {}
        for mode, runs in by_mode.items():
            entry[mode] = {
                "tokens_per_s": summary([r["tokens_per_s"] for r in runs]),
                "traversals_per_token": summary([r["traversals_per_token"] for r in runs]),
            }
        entry["speedup_of_medians"] = round(
            entry[on_mode]["tokens_per_s"]["median"] / entry["off"]["tokens_per_s"]["median"], 3
        )
        # the same prompt in the same round, off then on (or on then off)
        entry["paired_speedup"] = summary(
            [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(off, on, strict=True)]
        )
        entry["by_prompt"] = {
            name: {
                "paired_speedup": summary(
                    [
                        b["tokens_per_s"] / a["tokens_per_s"]
                        for a, b in zip(off, on, strict=True)
                        if a["prompt"] == name
                    ]
                ),
                "traversals_per_token_on": summary(
                    [r["traversals_per_token"] for r in on if r["prompt"] == name]
                ),
            }
            for name in PROMPTS
        }
        # each request, so a round far from the median can be read: a sampled request
        # that met a stop token early has few tokens to time
        keys = ("round", "prompt", "tokens", "tokens_per_s", "traversals_per_token")
        entry["runs"] = {
            mode: [
                {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys} for r in runs
            ]
            for mode, runs in by_mode.items()
        }
        if workload == "repetitive":  # greedy: the tokens must not change
            entry["identical_greedy_output"] = all(
                a["output_ids"] == b["output_ids"] for a, b in zip(off, on, strict=True)
            )
        result["workloads"][workload] = entry
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
