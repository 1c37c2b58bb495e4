"""SIGTERM drains, and no accepted task is lost to a stop.

A stopped gateway lets the tasks it accepted finish within its grace period before it
exits (they are in its SQLite store as completed when the process has gone); node 1
takes over meanwhile, and the restarted node 0 stands by, redirecting to it; a whole
cluster stopped at once exits 0 on every node, leaves what it could not finish in the
store, and runs it to the unsplit model's tokens after a restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from butterfly.schedule.state import TaskStatus
from butterfly.schedule.store import TaskStore
from tests.cluster_util import reference_tokens, running_cluster, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
PROMPTS = ["Butterfly", "Once upon a time", "a b c"]
NEW = 16


def submit(url: str) -> list[str]:
    ids = []
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_new_tokens": NEW}
        r = httpx.post(f"{url}/inference", json=body, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["task_id"])
    return ids


def results(url: str, ids: list[str]) -> list[dict[str, object]]:
    out = []
    with httpx.Client(timeout=10) as client:
        for task_id in ids:
            deadline = time.monotonic() + 120
            body: dict[str, object] = {}
            while time.monotonic() < deadline:
                body = client.get(f"{url}/result/{task_id}").json()
                if body.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            out.append(body)
    return out


def standing_by(url: str) -> httpx.Response:
    """The restarted node's answer once it stands by. `wait_ready` returns when the acting
    gateway is healthy, which the restarted node's `/health` names while it is still
    starting (a 503 saying so, as documented): CI once posted in that moment."""
    deadline, tries = time.monotonic() + 60, 0
    with httpx.Client(timeout=10) as client:
        while True:
            r = client.post(f"{url}/inference", json={"prompt": "x"})
            tries += 1
            if r.status_code != 503 or time.monotonic() > deadline or tries > 600:
                return r
            assert "serves no requests yet" in r.json()["error"]["message"], r.text
            time.sleep(0.1)


def test_a_stopped_gateway_drains_and_a_stopped_cluster_loses_nothing(
    tiny_model: Path, tmp_path: Path
) -> None:
    expected = [reference_tokens(tiny_model, p, NEW) for p in PROMPTS]
    with running_cluster(tiny_model, 4, tmp_path) as cluster:
        drained = submit(cluster.api_url)
        gateway = cluster.procs[0]
        gateway.terminate()
        assert gateway.wait(timeout=30) == 0
        store = TaskStore(tmp_path / "node-0" / "tasks.sqlite")
        try:
            states = [store.get(t) for t in drained]
        finally:
            store.close()
        assert [s.state.status if s else None for s in states] == [TaskStatus.COMPLETED] * 3

        # node 1 took over while node 0 was down: node 0 comes back as a standby, and
        # the tasks go to the acting gateway (which copies them to node 0). Restarted only
        # once node 1 acts: a node forked back at once (cli.prefork) is back before its
        # absence is noticed, and acts on
        successor = cluster.gateway_url(1)

        def node1_acts() -> bool:
            return httpx.get(f"{successor}/health", timeout=2).status_code == 200

        wait_until(node1_acts, "node 1 takes over")
        cluster.restart(0)
        cluster.wait_ready(120)
        assert cluster.acting_url() != cluster.api_url
        standby = standing_by(cluster.api_url)
        assert standby.status_code == 307, standby.text
        assert standby.headers["location"] == f"{cluster.acting_url()}/inference"
        resumed = submit(cluster.acting_url())
        codes = cluster.stop(grace_s=10.0)
        assert codes == [0, 0, 0, 0], f"exit codes after SIGTERM: {codes}"

        cluster.start()
        cluster.wait_ready(120)
        for body, tokens in zip(
            results(cluster.api_url, drained + resumed), expected * 2, strict=True
        ):
            assert body.get("status") == "completed", body
            assert body["output_ids"] == tokens
