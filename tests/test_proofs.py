"""`GET /result/{id}?proofs=true`: the signed record of every stage step behind a result.

A client that trusts nobody but the nodes' public keys can check each record itself.
"""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import httpx
import pytest

from butterfly.protocol.sign import verify_message
from butterfly.types.wire.agreement import Proof, decode
from tests.cluster_util import running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
NEW = 6


def test_result_with_proofs_lists_a_verifiable_record_per_stage_step(
    tiny_model: Path, tmp_path: Path
) -> None:
    with running_cluster(tiny_model, 4, tmp_path, f=1) as cluster:
        body = {"prompt": "proofs please", "max_new_tokens": NEW, "wait": True}
        done = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=120).json()
        assert done["verified"] == "audit"
        url = f"{cluster.api_url}/result/{done['task_id']}"
        assert "proofs" not in httpx.get(url, timeout=30).json()
        result = httpx.get(url, params={"proofs": "true"}, timeout=30).json()
        keys = tomllib.loads(cluster.configs[0].read_text())["cluster"]["public_keys"]

        chain = [s["node"] for s in result["stages"]]
        records = result["proofs"]
        assert len(records) == NEW * len(chain)  # one per step (prefill + decodes) per stage
        seen = set()
        for record in records:
            proof = decode(base64.b64decode(record["record"]))
            assert isinstance(proof, Proof)
            assert verify_message(proof, bytes.fromhex(keys[proof.sender]))
            assert not verify_message(proof, bytes.fromhex(keys[(proof.sender + 1) % 4]))
            assert record["node"] == chain[record["stage"]] == proof.sender
            assert proof.request_id == done["task_id"]
            seen.add((record["step"], record["stage"]))
        assert len(seen) == len(records)
