"""A successor whose API port is taken still takes over, and serves once the port frees.

Four real node processes, f = 1, gateways 0 and 1 (node 1's API on the port after node
0's). Another process holds node 1's API port from before the start: node 1's API (one
server for every role it plays) cannot bind, before node 0 is killed or after. uvicorn
ended such a node with `SystemExit`; now node 1 logs the failure, keeps its other roles
(its takeover is agreed, its stage serves), and binds again with backoff: once the port
is freed, its API answers requests.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from butterfly.cli.launcher import LocalCluster, node_configs
from tests.cluster_util import QUICK_PROBE, free_port, reference_tokens

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
PROMPT = "Once upon a time"
NEW = 8


def log_says(path: Path, text: str) -> bool:
    return path.is_file() and text in path.read_text(errors="replace")


def test_an_acting_gateway_whose_api_port_is_taken_retries_and_then_serves(
    tiny_model: Path, tmp_path: Path
) -> None:
    expected = reference_tokens(tiny_model, PROMPT, NEW)
    port = free_port()
    holder = socket.socket()  # another process on node 1's API port
    holder.bind(("127.0.0.1", port + 1))
    holder.listen()
    settings = {
        "coordination.acceptable_pause_ms": 400.0,
        "partition.strategy": "uniform",
        "cluster.gateways": [0, 1],
        **QUICK_PROBE,
    }
    configs = node_configs(
        nodes=4, f=1, model=tiny_model, api_port=port, data_dir=tmp_path, settings=settings
    )
    cluster = LocalCluster(configs, f"http://127.0.0.1:{port}", tmp_path)
    successor = f"http://127.0.0.1:{port + 1}"
    log1 = tmp_path / "node-1.log"
    try:
        cluster.start()
        cluster.wait_ready(120)
        cluster.kill(0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            log_says(log1, "node 1 acts as the gateway")
            and log_says(log1, "the gateway API cannot listen")
        ):
            assert cluster.procs[1].poll() is None, "node 1 died on its API's bind failure"
            time.sleep(0.2)
        # one API server for the node's life (api.switch), retrying its bind through the
        # standby role and the takeover alike
        assert log_says(log1, "the gateway API cannot listen")
        assert cluster.procs[1].poll() is None
        holder.close()  # the port is free again: node 1's next attempt binds it
        body: dict[str, object] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.post(
                    f"{successor}/inference",
                    json={"prompt": PROMPT, "max_new_tokens": NEW, "wait": True},
                    timeout=60,
                )
                body = r.json()
                if r.status_code == 200 and body.get("status") == "completed":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert body.get("status") == "completed", body
        assert body["output_ids"] == expected
        assert (
            'loop_restarts_total{loop="api"}' in httpx.get(f"{successor}/metrics", timeout=10).text
        )
    finally:
        holder.close()
        cluster.stop(grace_s=10.0)
        for p in cluster.procs:  # reaped by PID: none may outlive the test
            assert p.poll() is not None, f"node process {p.pid} is still running"
