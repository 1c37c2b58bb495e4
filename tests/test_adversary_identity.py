"""Adversaries against identity on a live 4-node cluster (f = 1, audit mode).

A member that sends the gateway step results for running tasks under the id of the
chain's last node (in the frame header, or in the message with its own header) has
every one of them dropped and counted; the answers stay correct and verified.

An outsider that reaches every node's port, knows the cluster id, the model hash, the
members' public keys and the ids of running tasks, but holds no member's key, tries
every kind of frame a node acts on (releases, results, cache copies, steps, plans,
config and agreement messages) through the real handshake, claiming a member's id, and
without any handshake at all, and with a 256 MiB first frame. None gets a frame
through: the tasks it aimed at finish with the single-process answer, verified, no task
fails and nobody is evicted.
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from butterfly.net.framing import LENGTH, Envelope, decode_frame, encode_frame
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.protocol.keys import KEY_FILE, load_or_create_key
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage, model_args
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.weights import model_hash
from butterfly.runtime.wire import encode_tensor
from butterfly.types.errors import ConnectionFailed
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.wire.control import AgreementFrame, ConfigPrepare, HelloAck, PlanAssign
from butterfly.types.wire.data import (
    CacheQuery,
    KvAppend,
    Release,
    StageStep,
    StepResult,
)
from butterfly.types.wire.frames import Message
from tests.cluster_util import running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
PROMPTS = ["Butterfly", "pipelines", "Once upon a time"]
NEW = 24


def reference(model: Path, prompt: str) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(prompt), NEW, stop_ids=codec.eos_ids))


def sample(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def frames(task_ids: list[str]) -> list[Message]:
    """One of every kind a node acts on, aimed at the running tasks."""
    rids = tuple(RequestId(t) for t in task_ids)
    steps = tuple(1 for _ in rids)
    return [
        Release(rids),
        StepResult(rids, steps, NodeId(1)),
        KvAppend(rids[0], 0, 1, 0),
        StageStep(rids, steps, steps, steps, (), NodeId(0), True),
        CacheQuery(rids),
        PlanAssign(Epoch(99), (1, 0, 1), "x"),
        ConfigPrepare("0" * 64),
        AgreementFrame(),
    ]


async def through_the_handshake(
    members: dict[int, tuple[str, int]], cluster_id: str, digest: str, task_ids: list[str]
) -> list[str]:
    """Every frame to every node, claiming to be the gateway (node 1 towards node 0), with
    a fresh key; returns how each attempt ended."""
    outcomes = []
    for target, address in members.items():
        claimed = NodeId(1 if target == 0 else 0)
        outsider = TcpTransport(
            identity=Identity(claimed, cluster_id, digest, key=SigningKey.generate(), keys={}),
            listen=("127.0.0.1", 0),
            peers={NodeId(target): address},
            emit=lambda event: None,
            epoch=lambda: Epoch(1),
            limits=TransportLimits(connect_attempts=1, breaker_threshold=1000),
        )
        try:
            for msg in frames(task_ids):
                try:
                    await outsider.send(NodeId(target), msg, channel="control")
                    outcomes.append(f"{msg.kind} to node {target} was sent")
                except ConnectionFailed as e:
                    outcomes.append("refused" if "refused the handshake" in str(e) else str(e))
        finally:
            await outsider.close()
    return outcomes


async def without_a_handshake(
    members: dict[int, tuple[str, int]], cluster_id: str, task_ids: list[str]
) -> list[str]:
    """A release frame where the Hello belongs, and a 256 MiB first frame, to every node;
    returns how each node answered after its opening hello."""
    outcomes = []
    release = Release(tuple(RequestId(t) for t in task_ids))
    for host, port in members.values():
        for first in (
            encode_frame(Envelope(release, NodeId(0), Epoch(1), cluster_id)),
            LENGTH.pack(256 << 20) + b"\0" * 4096,
        ):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                await reader.readexactly(length)  # the node's opening hello
                writer.write(first)
                await writer.drain()
                async with asyncio.timeout(30):
                    rest = await reader.read()
            except ConnectionError:
                rest = b""
            finally:
                writer.close()
            if not rest:
                outcomes.append("closed")
                continue
            answer = decode_frame(rest[LENGTH.size :], 1 << 16).msg
            refused = isinstance(answer, HelloAck) and not answer.accepted
            outcomes.append("refused" if refused else f"answered {answer.kind}")
    return outcomes


def test_an_outsider_without_a_member_key_gets_nothing_through(
    tiny_model: Path, tmp_path: Path
) -> None:
    with running_cluster(tiny_model, 4, tmp_path, f=1) as cluster:
        url = cluster.api_url
        configs = [tomllib.loads((tmp_path / f"node-{i}.toml").read_text()) for i in range(4)]
        members: dict[int, tuple[str, int]] = {}
        for i, cfg in enumerate(configs):
            host, port = cfg["node"]["listen"].rsplit(":", 1)
            members[i] = (host, int(port))
        cluster_id, digest = configs[0]["cluster"]["id"], model_hash(tiny_model)
        submitted: dict[str, str] = {}
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_new_tokens": NEW}
            r = httpx.post(f"{url}/inference", json=body, timeout=60)
            assert r.status_code == 202, r.text
            submitted[r.json()["task_id"]] = prompt
        task_ids = list(submitted)

        async def attack() -> tuple[list[str], list[str]]:
            return (
                await through_the_handshake(members, cluster_id, digest, task_ids),
                await without_a_handshake(members, cluster_id, task_ids),
            )

        outcomes, leftovers = asyncio.run(attack())
        assert outcomes == ["refused"] * (4 * len(frames(task_ids)))
        assert leftovers == ["refused", "closed"] * 4  # refused with a reason, or cut off
        results: list[dict[str, Any]] = []
        for task_id, prompt in submitted.items():
            r = httpx.get(f"{url}/result/{task_id}", params={"wait": 240}, timeout=300)
            assert r.status_code == 200, r.text
            results.append(r.json())
            assert r.json()["output_ids"] == reference(tiny_model, prompt)
            assert r.json()["verified"] == "audit"
        # node 0 serves the metrics: every attempt on it was refused and counted there
        refused = sample(url, "butterfly_messages_dropped_total", reason="handshake_refused")
        malformed = sample(url, "butterfly_messages_dropped_total", reason="handshake")
        assert refused >= len(frames(task_ids)) and malformed >= 1
        assert sample(url, "butterfly_tasks_total", status="failed") == 0.0
        assert sample(url, "butterfly_byzantine_evictions_total") == 0.0
        assert all(cluster.alive())


async def spray(
    forger: TcpTransport, forged: NodeId, last: NodeId, task_ids: list[str], vocab: int
) -> None:
    """Results for every step of every task, favouring the last token of the vocabulary,
    to the gateway: once under `last`'s id in the frame header, once under the forger's
    own id with `last` named in the body. Until cancelled (bounded in count)."""
    conn = await forger.connection(NodeId(0), "data")
    logits = torch.zeros(1, 1, vocab)
    logits[..., vocab - 1] = 1.0
    payload = encode_tensor(logits)
    for _ in range(5000):
        for task_id in task_ids:
            for step in range(1, NEW + 2):
                msg = StepResult((RequestId(task_id),), (step,), last)
                for header in (last, forged):
                    conn.node = header  # what the member writes in its frames
                    await conn.send(msg, payload)
        await asyncio.sleep(0.002)


def test_a_member_forging_results_under_another_id_is_ignored(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A member (it holds its own key: the test speaks with a replica's key file) sends
    the gateway step results for the running tasks, claiming to be the chain's last node
    in the frame header or in the message. None is used: the answers stay the
    single-process ones, verified, and nobody is evicted."""
    with running_cluster(tiny_model, 4, tmp_path, f=1) as cluster:
        url = cluster.api_url
        first = httpx.post(
            f"{url}/inference", json={"prompt": "x", "max_new_tokens": 2, "wait": True}, timeout=120
        ).json()
        chain = [NodeId(s["node"]) for s in first["stages"]]
        forged = NodeId(max(set(range(4)) - set(chain)))  # a replica, not in the chain
        configs = [tomllib.loads((tmp_path / f"node-{i}.toml").read_text()) for i in range(4)]
        keys = {
            NodeId(i): bytes.fromhex(k) for i, k in enumerate(configs[0]["cluster"]["public_keys"])
        }
        host, port = configs[0]["node"]["listen"].rsplit(":", 1)
        vocab = int(model_args(tiny_model)[1].vocab_size)
        task_ids: dict[str, str] = {}
        for prompt in PROMPTS:
            r = httpx.post(f"{url}/inference", json={"prompt": prompt, "max_new_tokens": NEW})
            task_ids[r.json()["task_id"]] = prompt

        async def scenario() -> list[dict[str, Any]]:
            forger = TcpTransport(
                identity=Identity(
                    forged,
                    configs[0]["cluster"]["id"],
                    model_hash(tiny_model),
                    key=load_or_create_key(tmp_path / f"node-{forged}" / KEY_FILE),
                    keys=keys,
                ),
                listen=("127.0.0.1", 0),
                peers={NodeId(0): (host, int(port))},
                emit=lambda event: None,
                epoch=lambda: Epoch(1),
            )
            attack = asyncio.create_task(spray(forger, forged, chain[-1], list(task_ids), vocab))
            try:
                async with httpx.AsyncClient(timeout=300) as client:
                    answers = await asyncio.gather(
                        *(client.get(f"{url}/result/{t}", params={"wait": 240}) for t in task_ids)
                    )
            finally:
                attack.cancel()
                await asyncio.gather(attack, return_exceptions=True)
                await forger.close()
            assert attack.cancelled(), "the forger sent until the answers came (never cut off)"
            return [a.json() for a in answers]

        results = asyncio.run(scenario())
        for result, prompt in zip(results, task_ids.values(), strict=True):
            assert result["output_ids"] == reference(tiny_model, prompt)
            assert result["verified"] == "audit"
        dropped = "butterfly_messages_dropped_total"
        assert sample(url, dropped, reason="sender_mismatch") >= 1
        assert sample(url, dropped, reason="not_entitled_step_result") >= 1
        assert sample(url, "butterfly_tasks_total", status="failed") == 0.0
        assert sample(url, "butterfly_byzantine_evictions_total") == 0.0
        assert all(cluster.alive())
