"""Chaos trials on real node processes: one seeded fault per trial, every answer checked.

Each trial starts a fresh loopback cluster (4 nodes, f = 1, audit), submits a few
requests, injects one fault chosen by the seed at a random moment (during prefill or
any token), and then checks the fault model's promise: no accepted task lost, no
wrong token, no failed task where the fault is survivable. It also times how long the
service takes to answer a fresh one-token request after the fault (detection and
re-planning included), the recovery time users see.

The CI form runs a few seeded trials (tests/test_chaos.py); `bench/chaos.py` runs many.
Every process a trial starts is reaped by PID (`LocalCluster.stop`), whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.launcher import LocalCluster, free_port_block, node_configs

PROMPTS = ("Butterfly", "Once upon a time", "a b c d e f", "0123456789", "pipelines")
NODES, F = 4, 1
SETTINGS: dict[str, Any] = {
    "coordination.acceptable_pause_ms": 400.0,  # several node processes per core here
    "partition.strategy": "uniform",
    "partition.compute_probe_s": 0.1,  # placement is uniform: a quicker start-up
}

FAULTS = (
    "kill_stage",
    "kill_two",
    "kill_restart",
    "freeze",
    "kill_gateway",
    "restart_all",
    "gateway_restart",
    "gateway_twice",
)
"""Survivable ones: a stage node killed (its standby takes over), two stage nodes killed
one after the other, a node killed and started again, a node frozen (SIGSTOP) and
thawed, the acting gateway killed for good (the next gateway-capable node takes over
from the copies it holds), the whole cluster stopped and started, the acting gateway
killed and started again (it comes back as a standby), and that twice: node 0 killed and
restarted, then node 1, which took over and is also the agreement's primary, killed and
restarted (node 0 takes the role back: a view change after a takeover, which no cluster
survived before)."""
GATEWAYS = 2
"""Gateway-capable nodes (the default, max(2, f + 1) for f <= 1); gateway k serves its
API on the first gateway's port + k, and clients try them in turn."""

F_OF = {"kill_two": 0}
NODES_OF = {"kill_two": 5}
"""Two crashes are more than f = 1 allows n = 4 (agreement needs 3 live members; tried,
the re-plan never commits), and more than any 4 members allow at all: a quorum must be a
majority even at f = 0 (protocol.quorum), so 4 survive one crash. That trial runs 5 nodes
at f = 0 (a quorum of 3, left standing after two crashes) with every layer range on
three of them."""
REPLICATION_OF = {"kill_two": 3}

Reference = Callable[[str, int], list[int]]


@dataclass
class Outcome:
    seed: int
    fault: str
    nodes: tuple[int, ...]
    at_s: float
    tasks: int = 0
    lost: int = 0
    wrong: int = 0
    failed: int = 0
    recovery_s: float | None = None
    shutdown_s: float | None = None  # whole-cluster restarts: SIGTERM to every node gone
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == self.wrong == self.failed == 0 and not self.errors


def _ask(urls: list[str], method: str, path: str, deadline: float, **kw: Any) -> httpx.Response:
    """One request to the first gateway that answers, as a client given every gateway's
    address does; a standby's 307 to the acting gateway is followed."""
    while True:
        for url in urls:
            try:
                return httpx.request(
                    method, f"{url}{path}", timeout=30, follow_redirects=True, **kw
                )
            except httpx.HTTPError:
                continue
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no gateway of {urls} answered {method} {path}")
        time.sleep(0.2)


def _submit(urls: list[str], prompt: str, new: int, deadline: float) -> str:
    body = {"prompt": prompt, "max_new_tokens": new}
    r = _ask(urls, "POST", "/inference", deadline, json=body)
    r.raise_for_status()
    return str(r.json()["task_id"])


def _result(urls: list[str], task_id: str, deadline: float) -> dict[str, Any] | None:
    """The task's terminal body; None if it is unknown (lost) or not done by `deadline`."""
    while time.monotonic() < deadline:
        try:
            r = _ask(urls, "GET", f"/result/{task_id}", deadline)
        except TimeoutError:
            break
        if r.status_code == 404:
            return None
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            if body.get("status") in ("completed", "failed", "cancelled"):
                return body
        time.sleep(0.1)  # running, or a gateway not serving yet (503)
    return {"status": "timeout"}


def _probe(urls: list[str], deadline: float) -> bool:
    """A fresh one-token request answered (the service is back)."""
    body = {"prompt": "probe", "max_new_tokens": 1, "wait": True}
    while time.monotonic() < deadline:
        try:
            r = _ask(urls, "POST", "/inference", deadline, json=body)
        except TimeoutError:
            return False
        if r.status_code == 200 and r.json().get("status") == "completed":
            return True
        time.sleep(0.05)
    return False


def _until_acting(url: str, *, timeout_s: float) -> None:
    """Until the gateway at `url` acts (a standby answers /health with 503)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not take over within {timeout_s:.0f} s")


def _until_standby(url: str, *, acting: int, timeout_s: float) -> None:
    """Until the gateway at `url` stands by and names `acting` as the acting gateway."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 503 and r.json().get("acting_gateway") == acting:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not stand by for node {acting} within {timeout_s:.0f} s")


def _inject(
    cluster: LocalCluster, fault: str, nodes: tuple[int, ...], rng: random.Random
) -> float | None:
    """Strike; for a whole-cluster restart, returns how long the SIGTERMed cluster took
    to exit (every node drained and gone)."""
    procs = cluster.procs
    if fault in ("kill_stage", "kill_two"):
        for i, node in enumerate(nodes):
            if i:
                time.sleep(rng.uniform(0.5, 2.0))  # the second after the first's recovery began
            cluster.kill(node)
    elif fault == "kill_restart":
        cluster.kill(nodes[0])
        time.sleep(rng.uniform(0.2, 2.0))
        cluster.restart(nodes[0])
    elif fault == "freeze":
        os.kill(procs[nodes[0]].pid, signal.SIGSTOP)
        try:
            time.sleep(rng.uniform(0.5, 4.0))
        finally:
            os.kill(procs[nodes[0]].pid, signal.SIGCONT)
    elif fault == "kill_gateway":
        cluster.kill(0)
    elif fault == "gateway_restart":
        cluster.kill(0)
        time.sleep(rng.uniform(0.0, 2.0))
        cluster.restart(0)
    elif fault == "gateway_twice":
        # each restarted only once the other took over: a node forked back within the
        # failure detector's timeout (cli.prefork) is back before it is missed, and acts on
        for gateway, other in ((0, 1), (1, 0)):
            cluster.kill(gateway)
            _until_acting(cluster.gateway_url(other), timeout_s=60.0)
            time.sleep(rng.uniform(0.0, 2.0))
            cluster.restart(gateway)
            if gateway == 0:
                _until_standby(cluster.gateway_url(0), acting=1, timeout_s=60.0)
    elif fault == "restart_all":
        t0 = time.monotonic()
        codes = cluster.stop(grace_s=10.0)
        took = time.monotonic() - t0
        if any(code != 0 for code in codes):
            raise RuntimeError(f"a node did not exit cleanly on SIGTERM: exit codes {codes}")
        cluster.start()
        return took
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    return None


def run_trial(
    seed: int,
    model: Path,
    work: Path,
    reference: Reference,
    *,
    new_tokens: int = 48,
    requests: int = 3,
    faults: tuple[str, ...] = FAULTS,
    timeout_s: float = 180.0,
) -> Outcome:
    """One seeded trial in its own cluster under `work`; never raises for a broken
    promise (the outcome says what broke), only for a cluster that cannot start."""
    rng = random.Random(seed)
    fault = faults[seed % len(faults)] if len(faults) > 1 else faults[0]
    size = NODES_OF.get(fault, NODES)
    stage_nodes = list(range(1, size))
    rng.shuffle(stage_nodes)
    nodes = (
        (0,)
        if fault == "gateway_restart"
        else (0, 1)
        if fault == "gateway_twice"
        else tuple(stage_nodes[: 2 if fault == "kill_two" else 1])
    )
    port = free_port_block(GATEWAYS)
    settings = {**SETTINGS, "partition.replication": REPLICATION_OF.get(fault, 0)}
    configs = node_configs(
        nodes=size,
        f=F_OF.get(fault, F),
        model=model,
        api_port=port,
        data_dir=work,
        settings=settings,
    )
    cluster = LocalCluster(configs, f"http://127.0.0.1:{port}", work)
    outcome = Outcome(seed, fault, nodes, at_s=rng.uniform(0.0, 0.6))
    try:
        cluster.start()
        cluster.wait_ready(120)
        urls = [cluster.gateway_url(k) for k in range(GATEWAYS)]
        deadline = time.monotonic() + timeout_s
        prompts = [rng.choice(PROMPTS) for _ in range(requests)]
        ids = [_submit(urls, p, new_tokens, deadline) for p in prompts]
        outcome.tasks = len(ids)
        time.sleep(outcome.at_s)  # 0 s lands in prefill; 0.6 s deep in decoding
        fault_at = time.monotonic()
        try:
            outcome.shutdown_s = _inject(cluster, fault, nodes, rng)
        except RuntimeError as e:  # a broken promise of the fault itself: reported
            outcome.errors.append(str(e))
        deadline = time.monotonic() + timeout_s
        if _probe(urls, deadline):
            outcome.recovery_s = round(time.monotonic() - fault_at, 3)
        else:
            outcome.errors.append("no fresh request answered after the fault")
        for task_id, prompt in zip(ids, prompts, strict=True):
            body = _result(urls, task_id, deadline)
            if body is None:
                outcome.lost += 1
            elif body["status"] != "completed":
                outcome.failed += 1
                outcome.errors.append(f"{task_id}: {body.get('status')} {body.get('error')}")
            elif body["output_ids"] != reference(prompt, new_tokens):
                outcome.wrong += 1
    finally:
        cluster.stop(grace_s=10.0)
    return outcome


__all__ = ["FAULTS", "Outcome", "run_trial"]
