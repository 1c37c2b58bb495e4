"""Replicate verification in a live cluster (n = 4, f = 1: two disjoint lanes, 0 -> 1 and
2 -> 3): answers stay the reference tokens, verified "replicate", and a liar in either lane
is caught on the spot and evicted once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_util import metric, running_cluster
from tests.test_byzantine import NEW, PROMPTS, reference

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
REPLICATE = {"byzantine.verification": "replicate"}


def verifications(url: str, outcome: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "butterfly_verifications_total"
                and sample.labels.get("check") == "replicate"
                and sample.labels.get("outcome") == outcome
            ):
                return float(sample.value)
    return 0.0


def kv_requests(url: str) -> dict[int, int]:
    """KV caches each node holds, from its heartbeat as the gateway saw it."""
    nodes = httpx.get(f"{url}/health", timeout=10).json()["nodes"]
    return {n["id"]: n.get("requests", 0) for n in nodes}


def infer(url: str, prompt: str) -> dict[str, object]:
    body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=300)
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()
    return result


def test_honest_lanes_agree_and_free_every_cache(tiny_model: Path, tmp_path: Path) -> None:
    with running_cluster(tiny_model, 4, tmp_path, f=1, settings=REPLICATE) as cluster:
        for prompt in PROMPTS:
            result = infer(cluster.api_url, prompt)
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "replicate"
            assert len(result["stages"]) == 2  # type: ignore[arg-type]
        assert verifications(cluster.api_url, "verified") == len(PROMPTS)
        assert metric(cluster.api_url, "butterfly_byzantine_evictions_total") == 0.0
        # both lanes' caches, on all four nodes, are released (heartbeats carry the counts)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(kv_requests(cluster.api_url).values()):
            time.sleep(0.2)
        assert kv_requests(cluster.api_url) == {0: 0, 1: 0, 2: 0, 3: 0}


@pytest.mark.parametrize(
    ("liar", "behaviour"),
    [(1, "corrupt"), (3, "corrupt"), (2, "wrong-layer")],
    ids=["chain-lane-corrupt", "second-lane-corrupt", "second-lane-wrong-layer"],
)
def test_a_liar_in_either_lane_is_outvoted_and_evicted_once(
    tiny_model: Path, tmp_path: Path, liar: int, behaviour: str
) -> None:
    with running_cluster(
        tiny_model, 4, tmp_path, f=1, settings=REPLICATE, liars={liar: behaviour}
    ) as cluster:
        holders = {
            n["id"] for n in httpx.get(f"{cluster.api_url}/health").json()["nodes"] if n["layers"]
        }
        assert holders == {0, 1, 2, 3}, "every node holds a range: the liar is in a lane"
        for prompt in PROMPTS:
            result = infer(cluster.api_url, prompt)
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "replicate"
            assert liar not in {s["node"] for s in result["stages"]}  # type: ignore[attr-defined]
        assert verifications(cluster.api_url, "liar_found") == 1.0
        assert metric(cluster.api_url, "butterfly_byzantine_evictions_total") == 1.0
        assert all(cluster.alive()), "an evicted liar is excluded, not killed"
