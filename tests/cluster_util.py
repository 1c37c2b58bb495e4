"""Starting real node processes for cluster tests, and reaping every one of them."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from butterfly.cli.launcher import LocalCluster, free_port_block, node_configs
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec

QUICK_PROBE: dict[str, Any] = {"partition.compute_probe_s": 0.1}
"""The nodes time their compute for 0.1 s instead of 0.5 when the gateway first asks them,
in turn: a 4-node tiny cluster was ready 1.6-2 s sooner (AMD EPYC, 2 cores). Placement
here is uniform, or depends on no more than the order of rates, which 0.1 s of trials
keeps."""


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Until `check()` holds (an HTTP error or a malformed body counts as not yet), polled
    every 0.1 s, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if check():
                return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def free_port() -> int:
    """An API port with the next ones free too (gateway k serves on port + k)."""
    return free_port_block(4)


@contextmanager
def running_cluster(
    model: Path,
    nodes: int,
    data: Path,
    *,
    f: int = 0,
    settings: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    liars: dict[int, str] | None = None,
    tls: bool = False,
) -> Iterator[LocalCluster]:
    """`liars` maps node -> behaviour of butterfly.testing.liars (a testing launch)."""
    port = free_port()
    # Test machines run several node processes per core; a longer allowed pause keeps a
    # busy-but-alive node from being declared failed (detection itself is benchmarked).
    # Uniform placement: these tests name which node runs which stage, and measured
    # placement may rightly leave a node idle on a busy machine (tested on its own).
    settings = {
        "coordination.acceptable_pause_ms": 400.0,
        "partition.strategy": "uniform",
        **QUICK_PROBE,
        **(settings or {}),
    }
    configs = node_configs(
        nodes=nodes, f=f, model=model, api_port=port, data_dir=data, settings=settings, tls=tls
    )
    cluster = LocalCluster(configs, f"http://127.0.0.1:{port}", data)
    if liars:
        cluster.command = (sys.executable, "-m", "butterfly.testing.node", "--config")
        cluster.extra_args = {n: ["--behaviour", b] for n, b in liars.items()}
    try:
        cluster.start()
        cluster.wait_ready(timeout_s)
        yield cluster
    finally:
        cluster.stop(grace_s=10.0)
        for p in cluster.procs:  # reaped by PID: none may outlive the test
            assert p.poll() is not None, f"node process {p.pid} is still running"


def reference_tokens(model: Path, prompt: str, new: int) -> list[int]:
    """The unsplit model's greedy tokens: what every cluster answer must equal."""
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(prompt), new, stop_ids=codec.eos_ids))


def metric(url: str, name: str) -> float:
    """A running cluster's metric `name` from `url`/metrics (0 when it has no sample)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def infer(url: str, prompt: str, new: int) -> dict[str, Any]:
    """`POST /inference`, waiting for the result, which must come back (no task fails)."""
    body = {"prompt": prompt, "max_new_tokens": new, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=180)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result
