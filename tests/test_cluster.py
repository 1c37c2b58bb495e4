"""Real node processes on 127.0.0.1: the split model answers like the unsplit one."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from butterfly.runtime.tokenizer import TextCodec
from tests.cluster_util import running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
PROMPTS = [
    "Hello",
    "The quick brown fox",
    "Butterfly",
    "a b c d e f",
    "0123456789",
    "pipelines",
    "zz",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    """Greedy continuations from the unsplit transformers model."""
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    codec = TextCodec.load(tiny_model)
    out = {}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([codec.encode(p)])
            n = ids.shape[1]
            for _ in range(12):
                nxt = model(ids).logits[0, -1].argmax().view(1, 1)
                ids = torch.cat([ids, nxt], dim=1)
                if int(nxt) in codec.eos_ids:
                    break
            out[p] = ids[0, n:].tolist()
    return out


def infer(url: str, prompt: str, **extra: object) -> dict:
    body = {"prompt": prompt, "max_new_tokens": 12, "wait": True, **extra}
    r = httpx.post(f"{url}/inference", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("nodes", [1, 2])
def test_small_clusters_match_transformers(
    tiny_model: Path, tmp_path: Path, reference: dict[str, list[int]], nodes: int
) -> None:
    with running_cluster(tiny_model, nodes, tmp_path) as cluster:
        for prompt in PROMPTS[:3]:
            result = infer(cluster.api_url, prompt)
            assert result["output_ids"] == reference[prompt]
            assert len(result["stages"]) == nodes


@pytest.fixture(scope="module")
def four(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(tiny_model, 4, tmp_path_factory.mktemp("four")) as cluster:
        yield cluster


def test_four_nodes_match_transformers(four, reference: dict[str, list[int]]) -> None:
    result = infer(four.api_url, PROMPTS[0])
    assert result["output_ids"] == reference[PROMPTS[0]]
    assert [s["node"] for s in result["stages"]] == [0, 1, 2, 3]
    health = httpx.get(f"{four.api_url}/health").json()
    assert health["healthy"] and [n["status"] for n in health["nodes"]] == ["healthy"] * 4


async def test_eight_concurrent_requests_are_all_correct(four, reference) -> None:
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(prompt: str) -> list[int]:
            body = {"prompt": prompt, "max_new_tokens": 12, "wait": True}
            r = await client.post(f"{four.api_url}/inference", json=body)
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]

        results = await asyncio.gather(*(one(p) for p in PROMPTS))
    assert results == [reference[p] for p in PROMPTS]


def kv_requests(url: str) -> list[int]:
    """KV caches each node holds, from its heartbeat as the gateway saw it."""
    return [n.get("requests", 0) for n in httpx.get(f"{url}/health").json()["nodes"]]


def test_cancel_mid_generation_frees_kv_on_every_node(four) -> None:
    body = {"prompt": "Butterfly", "max_new_tokens": 400}  # 400 tokens, no early stop
    r = httpx.post(f"{four.api_url}/inference", json=body, timeout=30)
    assert r.status_code == 202
    task = r.json()["task_id"]
    # one token out means its prefill ran through all four stages: each holds a cache
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = httpx.get(f"{four.api_url}/status/{task}").json()
        if snap["status"] == "computing" and snap.get("tokens_generated", 0) >= 1:
            break
        time.sleep(0.01)
    r = httpx.delete(f"{four.api_url}/tasks/{task}", timeout=30)
    assert r.status_code == 200, r.text
    status = httpx.get(f"{four.api_url}/status/{task}").json()["status"]
    assert status == "cancelled"
    time.sleep(0.5)  # five heartbeats: each node has reported what it holds since
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(kv_requests(four.api_url)):
        time.sleep(0.1)
    assert kv_requests(four.api_url) == [0, 0, 0, 0]


BAD_REQUESTS = [
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x" * 600}, 400, "context"),
    ({"prompt": "x", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**9}, 400, "max_new_tokens"),
    ({"input_ids": [1, 99999]}, 400, ""),
    ({}, 400, ""),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD_REQUESTS)
def test_bad_input_gets_4xx_and_every_node_stays_up(four, body, status, needle) -> None:
    r = httpx.post(f"{four.api_url}/inference", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] and needle in err["message"]
    assert all(four.alive())


def test_malformed_json_and_oversized_body(four) -> None:
    r = httpx.post(
        f"{four.api_url}/inference",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(
        f"{four.api_url}/inference",
        content=b"x" * (11 << 20),
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert all(four.alive())


def test_garbage_from_a_peer_is_dropped_and_counted(four, reference) -> None:
    import tomllib

    cfg = tomllib.loads(four.configs[2].read_text())
    host, port = cfg["node"]["listen"].rsplit(":", 1)
    for garbage in (
        b"\x00\x00\x00\x08garbage!",
        b"\xff\xff\xff\xff" + b"x" * 100,
        b"\x00\x00\x01\x00trunc",
    ):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(garbage)
    time.sleep(0.5)
    assert all(four.alive())
    result = infer(four.api_url, PROMPTS[1])
    assert result["output_ids"] == reference[PROMPTS[1]]


def test_metrics_are_prometheus_text(four) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    infer(four.api_url, PROMPTS[2])
    text = httpx.get(f"{four.api_url}/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for needed in (
        "butterfly_task_latency_seconds",
        "butterfly_tasks",
        "butterfly_time_to_first_token_seconds",
        "butterfly_bytes_transferred",
        "butterfly_messages_sent",
    ):
        assert needed in names, (needed, sorted(names))


def test_gateway_restart_runs_a_queued_task(tiny_model: Path, tmp_path: Path, reference) -> None:
    """Accept a task, kill the gateway before it runs, restart it: the task completes,
    run by whichever gateway acts then (node 1 takes over when it sees node 0 fail, and
    node 0 comes back as its standby; or node 0 is back before that)."""
    settings = {"scheduling.dispatch_batch_size": 1}
    with running_cluster(tiny_model, 2, tmp_path, settings=settings) as cluster:
        long = httpx.post(
            f"{cluster.api_url}/inference",
            json={"prompt": "long", "max_new_tokens": 400},
            timeout=30,
        )
        queued = httpx.post(
            f"{cluster.api_url}/inference",
            json={"prompt": PROMPTS[0], "max_new_tokens": 12},
            timeout=30,
        )
        assert long.status_code == queued.status_code == 202
        task = queued.json()["task_id"]
        assert httpx.get(f"{cluster.api_url}/status/{task}").json()["status"] == "queued"
        cluster.kill(0)
        cluster.restart(0)
        cluster.wait_ready(120)
        r = httpx.get(
            f"{cluster.acting_url()}/result/{task}",
            params={"wait": 60},
            timeout=90,
            follow_redirects=True,  # a standby answers 307 to the acting gateway
        )
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == reference[PROMPTS[0]]
