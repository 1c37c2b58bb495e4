"""Cluster-wide configuration on 4 real node processes (f = 1) with the tiny demo model.

Every node runs `butterfly.testing.config_faults`: node 2's component refuses
`partition.strategy = "hybrid"` (a PREPARE REJECT), node 1's fails once to apply
`scheduling.policy = "priority"` (a node that diverges after the commit). The tests share
one cluster and read positions relative to what they find, so their order does not matter
for what they check. The last three change an option and observe what the cluster then
does (401, a new plan, how results are verified), not what it reports.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.cli.launcher import LocalCluster, node_configs
from tests.cluster_util import QUICK_PROBE, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
FAULTS = (
    "--veto",
    '2:partition.strategy="hybrid"',
    "--fail-apply",
    '1:scheduling.policy="priority"',
)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    data = tmp_path_factory.mktemp("config-cluster")
    port = free_port()
    configs = node_configs(
        nodes=4, f=1, model=tiny_model, api_port=port, data_dir=data, settings=QUICK_PROBE
    )
    command = (sys.executable, "-m", "butterfly.testing.config_faults", *FAULTS, "--config")
    c = LocalCluster(configs, f"http://127.0.0.1:{port}", data, command=command)
    try:
        c.start()
        c.wait_ready(240.0)
        yield c
    finally:
        c.stop(grace_s=10.0)
        for p in c.procs:  # reaped by PID: none may outlive the test
            assert p.poll() is not None, f"node process {p.pid} is still running"


def get(c: LocalCluster, path: str) -> Any:
    r = httpx.get(f"{c.api_url}{path}", timeout=60.0)
    assert r.status_code == 200, r.text
    return r.json()


def post(c: LocalCluster, path: str, body: Any, **params: str) -> httpx.Response:
    return httpx.post(f"{c.api_url}{path}", json=body, params=params, timeout=60.0)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def positions(view: dict[str, Any]) -> dict[int, tuple[str, int]]:
    return {n["node"]: (n["cluster_hash"], n["seq"]) for n in view["nodes"] if n["reachable"]}


def test_an_update_commits_on_all_four_nodes(cluster: LocalCluster) -> None:
    before = get(cluster, "/api/v1/config")
    r = post(cluster, "/api/v1/config", {"partition.strategy": "uniform"}, reason="test")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seq"] == before["seq"] + 1
    assert body["nodes"] == {str(i): "applied" for i in range(4)}
    after = get(cluster, "/api/v1/config")
    assert positions(after) == {i: (body["cluster_hash"], body["seq"]) for i in range(4)}
    assert after["in_sync"] and after["config"]["partition"]["strategy"] == "uniform"
    newest = get(cluster, "/api/v1/config/history?limit=1")[0]
    assert newest["cluster_seq"] == body["seq"] and "test" in newest["reason"]


def test_one_reject_rolls_back_everywhere(cluster: LocalCluster) -> None:
    before = get(cluster, "/api/v1/config")
    r = post(cluster, "/api/v1/config", {"partition.strategy": "hybrid"})
    assert r.status_code == 409, r.text
    error = r.json()
    assert error["error"]["type"] == "update_rejected" and error["node"] == 2
    assert "cannot run with partition.strategy='hybrid'" in error["reason"]
    after = get(cluster, "/api/v1/config")
    assert positions(after) == positions(before)
    assert [n["version"] for n in after["nodes"]] == [n["version"] for n in before["nodes"]]


def test_conflicting_updates_at_once_end_in_one_agreed_order(cluster: LocalCluster) -> None:
    values = ("topology_aware", "load_balanced")
    barrier = threading.Barrier(len(values))
    answers: dict[str, httpx.Response] = {}

    def send(value: str) -> None:
        barrier.wait()
        answers[value] = post(cluster, "/api/v1/config", {"partition.strategy": value})

    threads = [threading.Thread(target=send, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120.0)
    codes = sorted(a.status_code for a in answers.values())
    assert codes in ([200, 200], [200, 409]), {v: a.text for v, a in answers.items()}
    won = [(a.json()["seq"], v) for v, a in answers.items() if a.status_code == 200]
    last_seq, winner = max(won)
    view = get(cluster, "/api/v1/config")
    assert view["in_sync"] and view["seq"] == last_seq
    assert view["config"]["partition"]["strategy"] == winner
    assert len({h for h, _ in positions(view).values()}) == 1


def test_a_node_killed_during_an_update_catches_up(cluster: LocalCluster) -> None:
    answers: list[httpx.Response] = []
    update = threading.Thread(
        target=lambda: answers.append(
            post(cluster, "/api/v1/config", {"byzantine.audit_fraction": 0.5})
        )
    )
    update.start()
    time.sleep(0.01)
    cluster.procs[3].send_signal(signal.SIGKILL)
    cluster.procs[3].wait(timeout=10)
    update.join(120.0)
    assert answers and answers[0].status_code == 200, answers[0].text if answers else None
    for k in range(3):  # more changes it misses while down
        r = post(cluster, "/api/v1/config", {"byzantine.audit_fraction": 0.6 + k / 10})
        assert r.status_code == 200 and r.json()["nodes"]["3"] == "unreachable", r.text
    cluster.restart(3)
    gateway = get(cluster, "/api/v1/config")

    def caught_up() -> bool:
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            return positions(get(cluster, "/api/v1/config")).get(3) == (
                gateway["cluster_hash"],
                gateway["seq"],
            )
        return False

    wait_until(caught_up, 180.0, "node 3 replays what it missed")
    r = post(cluster, "/api/v1/config", {"byzantine.audit_fraction": 1.0})
    assert r.status_code == 200 and r.json()["nodes"]["3"] == "applied", r.text


def test_a_diverged_node_is_flagged_and_config_sync_repairs_it(cluster: LocalCluster) -> None:
    r = post(cluster, "/api/v1/config", {"scheduling.policy": "priority"})
    assert r.status_code == 200, r.text
    assert r.json()["nodes"]["1"].startswith("diverged") and "failed to switch" in r.text
    wait_until(
        lambda: (
            httpx.get(f"{cluster.api_url}/health", timeout=30.0).json()["config"]["diverged"] == [1]
        ),
        10.0,
        "the monitor flags node 1",
    )
    health = httpx.get(f"{cluster.api_url}/health", timeout=30.0).json()
    assert health["services"]["config"] == "diverged" and "1" in health["config"]["errors"]
    out = CliRunner().invoke(app, ["config", "sync", "--url", cluster.api_url])
    assert out.exit_code == 0, out.output
    assert "node 1: synced" in out.output and "cluster in sync" in out.output
    view = get(cluster, "/api/v1/config")
    assert view["in_sync"] and len({h for h, _ in positions(view).values()}) == 1


def test_cli_update_from_a_file_and_rollback_through_the_gateway(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    start = get(cluster, "/api/v1/config")
    file = tmp_path / "cluster.toml"
    file.write_text(cluster.configs[0].read_text())
    runner = CliRunner()
    update = ["config", "update", "--file", str(file), "--set", "byzantine.rtol=0.01"]
    # the file may name paths on the nodes' machines, not on this one
    update += ["--set", f"model.path={tmp_path / 'only-on-the-nodes'}"]
    out = runner.invoke(app, [*update, "--url", cluster.api_url])
    assert out.exit_code == 0, out.output
    assert "byzantine.rtol: 0.001 -> 0.01" in out.output
    assert get(cluster, "/api/v1/config")["config"]["byzantine"]["rtol"] == 0.01
    back = runner.invoke(
        app, ["config", "rollback", "--version", str(start["version"]), "--url", cluster.api_url]
    )
    assert back.exit_code == 0, back.output
    view = get(cluster, "/api/v1/config")
    assert view["cluster_hash"] == start["cluster_hash"] and view["seq"] > start["seq"]
    assert view["in_sync"]
    listed = runner.invoke(app, ["config", "history", "--limit", "2", "--url", cluster.api_url])
    assert listed.exit_code == 0, listed.output
    assert f"rollback to version {start['version']}" in listed.output


def test_a_running_node_follows_an_edit_of_its_config_file(cluster: LocalCluster) -> None:
    """`butterfly start --config F` reloads F when it changes (it never did: the watcher
    was built and never started): a node-local limit written into the gateway's file
    limits its next request."""
    path = cluster.configs[0]
    text = path.read_text()
    body = {"prompt": "hello", "max_new_tokens": 8, "wait": True}

    def limited() -> bool:
        r = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=120.0)
        return r.status_code == 400 and "max_new_tokens" in r.text

    assert not limited()
    try:
        limit = "max_new_tokens_limit = 4\ndefault_max_new_tokens = 4\n"
        path.write_text(text + "\n[scheduling]\n" + limit)
        wait_until(limited, 30.0, "the edited limit refuses 8 new tokens")
    finally:
        path.write_text(text)
    wait_until(lambda: not limited(), 30.0, "the file's own limit back")


def test_a_rate_limit_change_applies_without_restart(cluster: LocalCluster) -> None:
    """api.rate_limit is dynamic-local: the gateway's limiter takes the new value at once."""
    body = {"prompt": "x", "max_new_tokens": 1}
    assert all(
        httpx.post(f"{cluster.api_url}/inference", json=body, timeout=30).status_code == 202
        for _ in range(3)
    )
    r = post(cluster, "/api/v1/config", {"api.rate_limit": 0.01, "api.rate_limit_burst": 1})
    assert r.status_code == 200, r.text
    codes = [
        httpx.post(f"{cluster.api_url}/inference", json=body, timeout=30).status_code
        for _ in range(3)
    ]
    assert 429 in codes, codes
    r = post(cluster, "/api/v1/config", {"api.rate_limit": 0.0})
    assert r.status_code in (200, 429), r.text


# --- a change takes effect on the running cluster (not only in what is reported) ---------


def infer(c: LocalCluster) -> dict[str, Any]:
    body = {"prompt": "hello", "max_new_tokens": 3, "wait": True}
    r = httpx.post(f"{c.api_url}/inference", json=body, timeout=120.0)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_revoked_api_token_is_refused_on_the_next_request(cluster: LocalCluster) -> None:
    r = post(cluster, "/api/v1/config", {"api.tokens": ["leaked", "kept"]})
    assert r.status_code == 200, r.text

    def update(token: str, patch: dict[str, Any]) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"}
        return httpx.post(
            f"{cluster.api_url}/api/v1/config", json=patch, headers=headers, timeout=60.0
        )

    try:
        assert post(cluster, "/api/v1/config", {"api.rate_limit": 99.0}).status_code == 401
        assert update("leaked", {"api.tokens": ["kept"]}).status_code == 200
        refused = update("leaked", {"api.rate_limit": 98.0})
        assert refused.status_code == 401, refused.text
    finally:
        assert update("kept", {"api.tokens": [], "api.rate_limit": 100.0}).status_code == 200


def health(c: LocalCluster) -> dict[str, Any]:
    return dict(httpx.get(f"{c.api_url}/health", timeout=30.0).json())


def change_strategy(c: LocalCluster) -> tuple[str, int, dict[str, Any]]:
    """Switch partition.strategy; returns it, the epoch before, and the plan it made."""
    before = health(c)
    current = get(c, "/api/v1/config")["config"]["partition"]["strategy"]
    target = "uniform" if current != "uniform" else "load_balanced"
    r = post(c, "/api/v1/config", {"partition.strategy": target})
    assert r.status_code == 200, r.text

    def made() -> bool:
        plan = health(c).get("plan") or {}
        return plan.get("epoch", 0) > before["epoch"] and plan.get("strategy") == target

    wait_until(made, 60.0, f"a plan of a later epoch than {before['epoch']} made by {target}")
    return target, before["epoch"], dict(health(c)["plan"])


def test_a_strategy_change_puts_a_new_plan_in_force(cluster: LocalCluster) -> None:
    # On this cluster (4 layers over a chain of 2 equal nodes) every strategy splits 2/2,
    # so the ranges may not move; what changes is the plan in force: decided again by the
    # new strategy over every live node, agreed and distributed for a new epoch.
    target, epoch, plan = change_strategy(cluster)
    assert plan["strategy"] == target and plan["epoch"] > epoch
    assert health(cluster)["epoch"] == plan["epoch"]
    assert infer(cluster)["output_ids"], "the new plan serves"


def test_audit_fraction_zero_stops_auditing_from_the_next_request(cluster: LocalCluster) -> None:
    change_strategy(cluster)  # a fresh plan: every range on f+1 nodes again, auditable
    r = post(cluster, "/api/v1/config", {"byzantine.audit_fraction": 1.0})
    assert r.status_code in (200, 409), r.text  # 409: already 1.0, nothing to change
    assert infer(cluster)["verified"] == "audit"
    r = post(cluster, "/api/v1/config", {"byzantine.audit_fraction": 0.0})
    assert r.status_code == 200, r.text
    assert infer(cluster)["verified"] == "none"
    r = post(cluster, "/api/v1/config", {"byzantine.verification": "replicate"})
    assert r.status_code == 200, r.text
    assert infer(cluster)["verified"] == "replicate"
    r = post(cluster, "/api/v1/config", {"byzantine.verification": "audit"})
    assert r.status_code == 200, r.text
