"""Members added and removed on real node processes, through the CLI and the agreement.

4 nodes (f = 1) start with a roster of four; `butterfly cluster add-member` puts a fifth
in, which then starts with the new roster and is seen healthy; with node 2 killed,
`butterfly cluster remove-member 3` commits only with the new node's vote (4 of 5), and
answers stay the unsplit model's. Every process is reaped by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.cli.launcher import CHILD_ENV, LocalCluster, node_configs
from butterfly.config.template import dump_toml
from tests.cluster_util import QUICK_PROBE, free_port, reference_tokens

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
PROMPT, NEW = "Once upon a time", 8


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def health(url: str) -> dict[int, str]:
    try:
        nodes = httpx.get(f"{url}/health", timeout=5).json()["nodes"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {n["id"]: n["status"] for n in nodes}


def infer(url: str) -> list[int]:
    r = httpx.post(
        f"{url}/inference",
        json={"prompt": PROMPT, "max_new_tokens": NEW, "wait": True},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return list(r.json()["output_ids"])


def test_a_member_is_added_and_one_removed_through_the_cli(
    tiny_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings: dict[str, Any] = {
        "coordination.acceptable_pause_ms": 400.0,
        "partition.strategy": "uniform",
        **QUICK_PROBE,
    }
    configs = node_configs(
        nodes=5, f=1, model=tiny_model, api_port=port, data_dir=tmp_path, settings=settings
    )
    docs = [tomllib.loads(p.read_text()) for p in configs]
    members, keys = docs[0]["cluster"]["members"], docs[0]["cluster"]["public_keys"]
    for path, doc in zip(configs[:4], docs[:4], strict=True):  # the first four know four
        doc["cluster"]["members"], doc["cluster"]["public_keys"] = members[:4], keys[:4]
        path.write_text(dump_toml(doc))
    expected = reference_tokens(tiny_model, PROMPT, NEW)
    cluster = LocalCluster(configs[:4], url, tmp_path)
    runner = CliRunner()
    try:
        cluster.start()
        cluster.wait_ready(240.0)
        assert sorted(health(url)) == [0, 1, 2, 3]
        added = runner.invoke(
            app, ["cluster", "add-member", members[4], "--public-key", keys[4], "--url", url]
        )
        assert added.exit_code == 0, added.output
        assert sorted(health(url)) == [0, 1, 2, 3, 4]
        with open(tmp_path / "node-4.log", "ab") as log:
            cluster.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "butterfly", "start", "--config", str(configs[4])],
                    stdout=log,
                    stderr=log,
                    env={**os.environ, **CHILD_ENV},
                )
            )
        wait_until(lambda: health(url).get(4) == "healthy", "node 4 healthy")
        assert infer(url) == expected
        cluster.kill(2)  # 4 of 5 votes left: the next change needs node 4's
        wait_until(lambda: health(url).get(2) == "failed", "node 2 failed")
        removed = runner.invoke(app, ["cluster", "remove-member", "3", "--url", url])
        assert removed.exit_code == 0, removed.output
        assert 3 not in health(url)
        assert infer(url) == expected
    finally:
        cluster.stop(grace_s=10.0)
        for p in cluster.procs:  # reaped by PID: none may outlive the test
            assert p.poll() is not None, f"node process {p.pid} is still running"
