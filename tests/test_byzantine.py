"""Lying nodes in a live cluster (n = 4, f = 1): every answer stays correct and verified,
and the liar is caught (by the audit or by its own conflicting votes) and evicted once,
or, one that only leaves its work unanswered, suspended by the gateway's step-timeout
rule. With f + 1 liars no wrong answer is ever verified."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from tests.cluster_util import metric, running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
PROMPTS = ["Butterfly", "pipelines", "Once upon a time"]
NEW = 24


def reference(model: Path, prompt: str) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(prompt), NEW, stop_ids=codec.eos_ids))


@pytest.mark.parametrize(
    ("liar", "behaviour"),
    [(1, "corrupt"), (1, "wrong-layer"), (3, "corrupt"), (3, "wrong-layer")],
    ids=["chain-corrupt", "chain-wrong-layer", "auditor-corrupt", "auditor-wrong-layer"],
)
def test_liar_is_caught_and_evicted(
    tiny_model: Path, tmp_path: Path, liar: int, behaviour: str
) -> None:
    with running_cluster(tiny_model, 4, tmp_path, f=1, liars={liar: behaviour}) as cluster:
        plan_nodes = {
            n["id"] for n in httpx.get(f"{cluster.api_url}/health").json()["nodes"] if n["layers"]
        }
        assert liar in plan_nodes, "the liar must hold layers for the test to mean anything"
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
            r = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=180)
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "audit"
            assert liar not in {s["node"] for s in result["stages"]}
        assert metric(cluster.api_url, "butterfly_byzantine_evictions_total") == 1.0
        assert all(cluster.alive()), "an evicted liar is excluded, not killed"


def test_honest_cluster_verifies_every_result(tiny_model: Path, tmp_path: Path) -> None:
    with running_cluster(tiny_model, 4, tmp_path, f=1) as cluster:
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
            result = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=180).json()
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "audit"
            assert len(result["stages"]) == 2  # 4 nodes, every range held twice
        assert metric(cluster.api_url, "butterfly_byzantine_evictions_total") == 0.0


def health(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/health", timeout=30)
    return dict(r.json())


def plan_nodes(url: str) -> set[int]:
    return {n["id"] for n in health(url)["nodes"] if n["layers"]}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:.0f} s: {what}")
        time.sleep(0.5)


def infer(url: str, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json())


# Steps and audits give up after 1.5 s (the slow liar answers 5 s late); honest steps of
# the tiny model take milliseconds, and two timeouts in a row are needed to suspend. A
# silent node 1 is also the agreement's first primary and casts no vote: the others
# suspect it after 3 s instead of the default 10 (at start-up, and when the plan without
# it is agreed).
UNRESPONSIVE = {
    "network.step_timeout_ms": 1500,
    "byzantine.max_step_timeouts": 2,
    "coordination.view_change_timeout_ms": 3000,
}


@pytest.mark.parametrize(
    ("liar", "behaviour"),
    [(1, "silent"), (1, "slow"), (3, "silent")],
    ids=["chain-silent", "chain-slow", "auditor-silent"],
)
def test_unresponsive_node_is_suspended_by_the_step_timeout_rule(
    tiny_model: Path, tmp_path: Path, liar: int, behaviour: str
) -> None:
    with running_cluster(
        tiny_model, 4, tmp_path, f=1, settings=UNRESPONSIVE, liars={liar: behaviour}
    ) as cluster:
        url = cluster.api_url
        assert liar in plan_nodes(url), "the liar must hold layers for the test to mean anything"
        for prompt in PROMPTS:
            result = infer(url, prompt)
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "audit"
        # it answered nothing in time: by now it is out of the plan, its heartbeats go on
        wait_until(lambda: liar not in plan_nodes(url), 120, f"node {liar} leaves the plan")
        status = {n["id"]: n["status"] for n in health(url)["nodes"]}
        assert status[liar] == "healthy", "out for silence, not declared crashed"
        assert metric(url, "butterfly_node_failures_total") == 0.0  # a suspension, not that
        result = infer(url, PROMPTS[0])
        assert result["output_ids"] == reference(tiny_model, PROMPTS[0])
        assert result["verified"] == "audit"
        assert liar not in {s["node"] for s in result["stages"]}
        # out for a while, not evicted: nothing proves it lied (an honest node behind a
        # TCP cut, its heartbeats arriving, looks the same: one was evicted for good)
        assert metric(url, "butterfly_suspensions_total") == 1.0
        assert metric(url, "butterfly_byzantine_evictions_total") == 0.0
        assert not any(n["evicted"] for n in health(url)["nodes"])
        assert all(cluster.alive()), "a suspended node is excluded, not killed"


def test_equivocating_voter_is_evicted_on_its_signed_votes(
    tiny_model: Path, tmp_path: Path
) -> None:
    liar = 1
    with running_cluster(tiny_model, 4, tmp_path, f=1, liars={liar: "equivocate"}) as cluster:
        url = cluster.api_url
        result = infer(url, PROMPTS[0])
        assert result["output_ids"] == reference(tiny_model, PROMPTS[0])
        assert result["verified"] == "audit"
        # something must be agreed for a vote to lie: a cluster-wide config update
        r = httpx.post(
            f"{url}/api/v1/config",
            json={"scheduling.policy": "priority"},
            params={"reason": "equivocation test"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        wait_until(
            lambda: (
                metric(url, "butterfly_byzantine_evictions_total") == 1.0
                and liar not in plan_nodes(url)
            ),
            120,
            f"node {liar} is evicted on the evidence",
        )
        for prompt in PROMPTS:
            result = infer(url, prompt)
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "audit"
            assert liar not in {s["node"] for s in result["stages"]}
        assert metric(url, "butterfly_byzantine_evictions_total") == 1.0
        assert all(cluster.alive())


def test_more_than_f_liars_never_get_a_wrong_answer_verified(
    tiny_model: Path, tmp_path: Path
) -> None:
    """f + 1 liars hold both copies of the second range (node 1 runs it in the chain, node
    3 audits it): the cluster may refuse, answer unverified, or evict, never verify a
    wrong answer."""
    liars = {1: "corrupt", 3: "wrong-layer"}
    with running_cluster(tiny_model, 4, tmp_path, f=1, liars=liars) as cluster:
        url = cluster.api_url
        first = health(url)["nodes"]
        ranges = {n["id"]: tuple(n["layers"]) for n in first if n["layers"]}
        assert ranges[1] == ranges[3], "both copies of one range must be held by the liars"
        verified = 0
        for prompt in PROMPTS * 2:
            body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
            # followed: a gateway that lost its role points to the acting one (307)
            r = httpx.post(f"{url}/inference", json=body, timeout=300, follow_redirects=True)
            if r.status_code != 200:
                continue  # refusing is allowed
            result = r.json()
            if result["verified"] not in ("none", None):
                assert result["output_ids"] == reference(tiny_model, prompt), result
                verified += 1
        # these two contradict each other: the re-execution convicts both, and the honest
        # nodes left answer (so the check above cannot pass by refusing everything)
        assert verified > 0
        assert all(cluster.alive())
