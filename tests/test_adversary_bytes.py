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

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from tests.cluster_util import infer, metric, running_cluster

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
            result = infer(cluster.api_url, prompt, NEW)
            assert result["verified"] == mode
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert LIAR not in {s["node"] for s in result["stages"]}
        health = httpx.get(f"{cluster.api_url}/health", timeout=30).json()
        # evicted by an agreed EvictNode: out of the plan, still running, and alone
        holders = {n["id"] for n in health["nodes"] if n["layers"]}
        assert LIAR not in holders
        assert holders <= {0, 2, 3}
        assert all(cluster.alive())  # excluded, not killed
        # the liar, once; no honest node
        assert metric(cluster.api_url, "butterfly_byzantine_evictions_total") == 1.0


def test_a_middle_stage_lying_below_its_records_is_evicted_not_its_receiver(
    tiny_model: Path, tmp_path: Path
) -> None:
    """n = 6, f = 1, chain 0 (the gateway) -> 1 -> 2: node 1 halves all but each row's
    largest values and signs exactly what it sends, which its records cannot show. Node 2
    computed honestly on it and contradicted the audit; it used to be evicted for it.
    Asked over its socket for what it received, it clears itself with bytes node 1
    signed: node 1 is evicted, and the answers are right and verified."""
    liars = {1: "below-fingerprint"}
    settings = {"byzantine.verification": "audit"}
    with running_cluster(tiny_model, 6, tmp_path, f=1, settings=settings, liars=liars) as cluster:
        nodes = httpx.get(f"{cluster.api_url}/health", timeout=30).json()["nodes"]
        middle = {
            n["id"] for n in nodes if n["layers"] and n["layers"][0] > 0 and n["layers"][1] < 4
        }
        assert 1 in middle, nodes  # node 1 holds a range with a stage after it
        for prompt in PROMPTS:
            result = infer(cluster.api_url, prompt, NEW)
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "audit", result
        health = httpx.get(f"{cluster.api_url}/health", timeout=30).json()
        holders = {n["id"] for n in health["nodes"] if n["layers"]}
        assert 1 not in holders and 2 in holders, health["nodes"]
        # node 1, once; never node 2
        assert metric(cluster.api_url, "butterfly_byzantine_evictions_total") == 1.0
