"""A last stage that signs its honest logits and sends others, on real processes.

The attack issue 12 demonstrated on a running cluster: every answer came back wrong and
verified, and nobody was evicted. Now the gateway checks the logits it samples from
against the last stage's signed record, convicts the node that sent them, and re-runs
the step on the new plan. n = 4, f = 1, in `audit` and in `replicate` mode; the same and
more liars run in one process in tests/test_adversary_bytes_inprocess.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from tests.cluster_util import running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
PROMPTS = ("Butterfly", "Once upon a time")
NEW = 12
LIAR = 1  # the chain is 0 (the gateway) -> 1


def reference(model: Path, prompt: str) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(prompt), NEW, stop_ids=codec.eos_ids))


@pytest.mark.parametrize("mode", ["audit", "replicate"])
def test_sign_honest_send_corrupt_last_stage_is_evicted(
    tiny_model: Path, tmp_path: Path, mode: str
) -> None:
    settings = {"byzantine.verification": mode}
    liars = {LIAR: "sign-honest-send-corrupt"}
    with running_cluster(tiny_model, 4, tmp_path, f=1, settings=settings, liars=liars) as cluster:
        nodes = httpx.get(f"{cluster.api_url}/health", timeout=30).json()["nodes"]
        assert LIAR in {n["id"] for n in nodes if n["layers"]}
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_new_tokens": NEW, "wait": True}
            r = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=180)
            assert r.status_code == 200, r.text  # no task failed
            result = r.json()
            assert result["verified"] == mode
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert LIAR not in {s["node"] for s in result["stages"]}
        health = httpx.get(f"{cluster.api_url}/health", timeout=30).json()
        # evicted by an agreed EvictNode: out of the plan, still running, and alone
        holders = {n["id"] for n in health["nodes"] if n["layers"]}
        assert LIAR not in holders
        assert holders <= {0, 2, 3}
        assert all(cluster.alive())  # excluded, not killed
        text = httpx.get(f"{cluster.api_url}/metrics", timeout=30).text
        evictions = [
            float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "butterfly_byzantine_evictions_total"
        ]
        assert evictions == [1.0]  # the liar, once; no honest node
