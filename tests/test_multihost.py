"""Four "hosts" on one machine: a node per network namespace, configs from `butterfly init`.

What loopback cannot show: the configs `init` writes work between hosts with their own
addresses (nodes bind all interfaces, dial each other's host address, prove themselves
over mutual TLS with the certificates init made), and a client outside every node's
namespace reaches the gateway. Then a non-gateway node is killed and, with f = 1, the
next answers are still the unsplit model's. Skips where namespaces cannot be made.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from butterfly.cli.hosts import InitOptions, add_host, init_cluster
from butterfly.cli.launcher import LocalCluster
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.netns import Hosts, cluster_on_hosts, leftovers, unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
PROMPTS = ["Hello", "Once upon a time", "0123456789"]
NEW = 12
# a busy test machine runs four nodes on two cores; see tests/cluster_util.py
SETTINGS = {
    "coordination.acceptable_pause_ms": 400.0,
    "partition.strategy": "uniform",
    "partition.compute_probe_s": 0.1,  # as tests.cluster_util.QUICK_PROBE
}


def reference(model: Path, prompt: str) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(prompt), NEW, stop_ids=codec.eos_ids))


def infer(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=180, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


def new_node_status(url: str, address: str, timeout_s: float = 30.0) -> str:
    """The gateway's view of the node at `address`, once healthy or after `timeout_s`."""
    deadline, status = time.monotonic() + timeout_s, "unlisted"
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health", timeout=10, trust_env=False).json()
        status = {n["address"]: n["status"] for n in health["nodes"]}.get(address, "unlisted")
        if status == "healthy":
            break
        time.sleep(0.5)
    return status


@pytest.fixture(scope="module")
def namespaces() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"cannot make network namespaces here: {reason}")


def test_four_hosts_answer_over_tls_and_survive_a_killed_node(
    namespaces: None, tiny_model: Path, tmp_path: Path
) -> None:
    expected = {p: reference(tiny_model, p) for p in PROMPTS}
    made: list[Hosts] = []
    with cluster_on_hosts(tiny_model, tmp_path, 4, f=1, settings=SETTINGS) as (hosts, cluster):
        made.append(hosts)
        for i in range(4):  # each node is in its own namespace, on its own address
            config = (tmp_path / f"node-{i}" / "butterfly.toml").read_text()
            assert f'"{hosts.address(i)}:9000"' in config
            assert "enabled = true" in config  # TLS, as init wrote it
        health = httpx.get(f"{cluster.api_url}/health", timeout=10, trust_env=False).json()
        assert {n["address"] for n in health["nodes"]} >= {
            f"{hosts.address(i)}:9000" for i in range(1, 4)
        }, health
        first = infer(cluster.api_url, PROMPTS[0])
        assert first["output_ids"] == expected[PROMPTS[0]]
        assert first["verified"] == "audit"

        victim = next(s["node"] for s in first["stages"] if s["node"] != 0)
        cluster.kill(victim)
        for prompt in PROMPTS[1:]:
            result = infer(cluster.api_url, prompt)
            assert result["output_ids"] == expected[prompt], prompt
            assert victim not in {s["node"] for s in result["stages"]}
        assert not cluster.alive()[victim] and all(
            alive for i, alive in enumerate(cluster.alive()) if i != victim
        )
    # every node reaped by PID, every namespace and link gone
    assert all(p.poll() is not None for p in cluster.procs)
    assert leftovers(made[0]) == []


def test_hosts_clean_up_after_a_failed_start(namespaces: None) -> None:
    """A failure half-way through making the hosts leaves nothing behind."""
    hosts = Hosts(2)
    hosts.subnet = "10.213.300"  # not an address: `ip addr add` on the bridge fails
    with pytest.raises(subprocess.CalledProcessError):
        hosts.open()
    assert leftovers(hosts) == []


def test_a_host_added_by_init_joins_after_a_full_restart(
    namespaces: None, tiny_model: Path, tmp_path: Path
) -> None:
    """DEPLOY.md's procedure: stop every node, `init --add-host`, start every node; the
    new host's key and certificate (signed by the same CA) are accepted and it serves."""
    expected = reference(tiny_model, PROMPTS[1])
    with Hosts(5) as hosts:
        addresses = tuple(f"{hosts.address(i)}:9000" for i in range(5))
        opts = InitOptions(hosts=addresses[:4], model=str(tiny_model), f=1, settings=SETTINGS)
        configs = init_cluster(opts, tmp_path)
        url = f"http://{hosts.address(0)}:8080"
        prefix = {i: hosts.exec_prefix(i) for i in range(5)}
        clusters = [LocalCluster(configs, url, tmp_path, prefix=prefix)]
        try:
            clusters[0].start()
            clusters[0].wait_ready(120)
            assert infer(url, PROMPTS[1])["output_ids"] == expected
            clusters[0].stop()
            added = add_host(tmp_path, addresses[4])
            clusters.append(LocalCluster([*configs, added.config], url, tmp_path, prefix=prefix))
            clusters[1].start()
            clusters[1].wait_ready(120)
            assert new_node_status(url, addresses[4]) == "healthy"
            assert infer(url, PROMPTS[1])["output_ids"] == expected
        finally:
            for cluster in clusters:
                cluster.stop(grace_s=10.0)
    assert all(p.poll() is not None for c in clusters for p in c.procs)
    assert leftovers(hosts) == []
