"""`butterfly cluster up` as a user runs it: relative paths, TLS, a killed node restarted,
SIGTERM stops it all; `--set api.port` moves the API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.cluster_util import free_port

pytestmark = pytest.mark.timeout(180)


def node_pids(tmp_path: Path, node: int) -> list[int]:
    """PIDs of node `node` of the cluster under `tmp_path`, found by its config's path."""
    config = str(tmp_path / "data" / f"node-{node}.toml")
    found = subprocess.run(["pgrep", "-f", config], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


@contextmanager
def cluster_up(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`butterfly cluster up ARGS` run from `tmp_path` with this checkout's code, its
    stderr in `tmp_path/cluster-up.log`; killed if still running at the end, and no node
    of `tmp_path/data` may be left running."""
    cmd = [sys.executable, "-m", "butterfly", "cluster", "up", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    with open(tmp_path / "cluster-up.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stderr=out, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == [], f"node processes left running: {leftovers}"


def test_cluster_up_with_relative_paths_serves_and_stops_on_sigterm(
    tiny_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "model").symlink_to(tiny_model)
    port = free_port()
    args = ["--nodes", "2", "--api-port", str(port), "--data", "data", "--model", "model"]
    # uniform: both nodes hold layers whatever the machine's load made them measure (the
    # measured placement may leave a node out of a tiny model's plan)
    args += ["--tls", "--set", 'partition.strategy="uniform"']
    log = tmp_path / "cluster-up.log"
    url = f"http://127.0.0.1:{port}"
    with cluster_up(tmp_path, *args) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("healthy"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert proc.poll() is None, "cluster up exited during start-up"
            time.sleep(0.2)
        body = {"prompt": "Hi", "max_new_tokens": 3, "wait": True}
        r = httpx.post(f"{url}/inference", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [s["node"] for s in r.json()["stages"]] == [0, 1]
        assert (tmp_path / "data" / "tls" / "ca.pem").is_file()

        # a node killed is reported and restarted while the gateway keeps serving
        # cluster up itself must be past its start-up (a node dying before it saw the
        # cluster healthy stops it, as a start-up failure should)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "cluster up" not in log.read_text(errors="replace"):
            time.sleep(0.1)
        assert "cluster up" in log.read_text(errors="replace")
        victim = node_pids(tmp_path, 1)
        assert len(victim) == 1
        os.kill(victim[0], signal.SIGKILL)
        r = httpx.post(f"{url}/inference", json=body, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and node_pids(tmp_path, 1) in ([], victim):
            time.sleep(0.2)
        again = node_pids(tmp_path, 1)
        assert again and again != victim, "node 1 was not restarted"
        assert proc.poll() is None, "cluster up exited when a node died"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_cluster_up_with_api_port_set_waits_on_that_port(tiny_model: Path, tmp_path: Path) -> None:
    """`--set api.port=P` is what the node files say, so the gateway serves on P: `cluster
    up` waited on `--api-port`'s URL instead, said "cluster not healthy after 120 s" and
    stopped a healthy cluster (a review). The tiny model is healthy in ~15 s on 2 cores."""
    flag_port, set_port = free_port(), free_port()
    args = ["--nodes", "1", "--api-port", str(flag_port), "--data", str(tmp_path / "data")]
    args += ["--model", str(tiny_model), "--set", f"api.port={set_port}"]
    log = tmp_path / "cluster-up.log"
    with cluster_up(tmp_path, *args) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "cluster up" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            time.sleep(0.5)
        text = " ".join(log.read_text(errors="replace").split())
        assert f"API at http://127.0.0.1:{set_port}" in text, text[-300:]
        assert httpx.get(f"http://127.0.0.1:{set_port}/health", timeout=5).json()["healthy"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
