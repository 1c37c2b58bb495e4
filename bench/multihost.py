"""From `butterfly init` to the first verified answer on four namespaced hosts with TLS.

Each run makes four network namespaces (butterfly.testing.netns; needs root), writes the
hosts' files with `init_cluster` (keys, CA, certificates, configs), starts one node per
namespace, waits for a healthy cluster and sends one request whose answer must be the
unsplit model's and verified. The clock runs from before `init` to that answer. The
reference, measured in the same run: the same four nodes on 127.0.0.1 with TLS, written
by the loopback launcher (`node_configs`), from writing the configs to the same answer.

    nice -n 10 python bench/multihost.py [--runs 3] [--size tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.netns import cluster_on_hosts, unavailable
from common import bench_model, machine, summary

PROMPT = "Once upon a time"
NEW = 8
SETTINGS = {"coordination.acceptable_pause_ms": 400.0, "partition.strategy": "uniform"}


def check(url: str, expected: list[int]) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": NEW, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=300, trust_env=False)
    r.raise_for_status()
    result = r.json()
    if result["output_ids"] != expected or result.get("verified") in (None, "none"):
        raise SystemExit(f"wrong or unverified answer: {result}")


def on_hosts(model: Path, expected: list[int]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        with cluster_on_hosts(model, Path(tmp), 4, f=1, settings=SETTINGS) as (_, cluster):
            check(cluster.api_url, expected)
            return time.monotonic() - start
    raise AssertionError("unreachable")


def on_loopback(model: Path, expected: list[int]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        (api_port,) = free_ports(1)
        configs = node_configs(
            nodes=4,
            f=1,
            model=model,
            api_port=api_port,
            data_dir=Path(tmp),
            settings=dict(SETTINGS),
            tls=True,
        )
        cluster = LocalCluster(configs, f"http://127.0.0.1:{api_port}", Path(tmp))
        try:
            cluster.start()
            cluster.wait_ready(300)
            check(cluster.api_url, expected)
            return time.monotonic() - start
        finally:
            cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    reason = unavailable()
    if reason is not None:
        print(
            json.dumps({"error": f"cannot make network namespaces: {reason}", "machine": machine()})
        )
        sys.exit(1)
    model = bench_model(args.size)
    codec = TextCodec.load(model)
    expected = list(
        generate([load_stage(model)], codec.encode(PROMPT), NEW, stop_ids=codec.eos_ids)
    )
    hosts, loopback = [], []
    for _ in range(args.runs):
        hosts.append(on_hosts(model, expected))
        if not args.no_reference:
            loopback.append(on_loopback(model, expected))
    out: dict[str, Any] = {
        "bench": "multihost",
        "what": "butterfly init to the first verified answer, 4 namespaced hosts, f=1, TLS",
        "model": f"demo-{args.size}",
        "init_to_verified_answer_s": summary(hosts),
        "target_s": 60,
        "machine": machine(),
    }
    if loopback:
        out["reference_loopback_s"] = summary(loopback)
        out["ratio_to_reference"] = round(summary(hosts)["median"] / summary(loopback)["median"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
