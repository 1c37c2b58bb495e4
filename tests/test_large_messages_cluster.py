"""Messages over the frame limit on a live cluster (n = 4, f = 1, audit mode): with a
64 KiB frame limit, a long prompt's activations, the KV copies to the standbys and the
audit's re-run inputs and replies all exceed one frame; they travel in chunks, the answer
equals the single-process reference, is verified, and nobody is evicted or blamed."""

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
PROMPT = "Once upon a time " * 20  # 341 tokens: [1, 341, 64] fp32 activations are 87 KB
NEW = 32
FRAME = 1 << 16


def samples(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def test_an_audit_of_a_long_generation_over_the_frame_limit_succeeds(
    tiny_model: Path, tmp_path: Path
) -> None:
    codec = TextCodec.load(tiny_model)
    ids = codec.encode(PROMPT)
    assert len(ids) * 64 * 4 > FRAME  # the prefill's activations alone need chunks
    expected = list(generate([load_stage(tiny_model)], ids, NEW, stop_ids=codec.eos_ids))
    settings = {"network.max_frame_bytes": FRAME}
    with running_cluster(tiny_model, 4, tmp_path, f=1, settings=settings) as cluster:
        body = {"prompt": PROMPT, "max_new_tokens": NEW, "wait": True}
        r = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=300)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["output_ids"] == expected
        assert result["verified"] == "audit"
        assert samples(cluster.api_url, "butterfly_byzantine_evictions_total") == 0.0
        assert samples(cluster.api_url, "butterfly_peer_errors_total") == 0.0
