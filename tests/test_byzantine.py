"""Lying nodes in a live cluster (n = 4, f = 1): every answer stays correct and verified,
and the liar is caught by the audit and evicted once."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from tests.cluster_util import running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
PROMPTS = ["Butterfly", "pipelines", "Once upon a time"]
NEW = 24


def reference(model: Path, prompt: str) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(prompt), NEW, stop_ids=codec.eos_ids))


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize(
    ("liar", "behaviour"),
    [(1, "corrupt"), (1, "wrong-layer"), (3, "corrupt"), (2, "wrong-layer")],
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
