"""Speculative decoding under the audit (`byzantine.verification = "audit"`, the default):
a verify step's records are held to the rows the request kept, those before the first
rejected draft token, which is all one prefill of the final sequence sees. Audited
requests used to decode one token per traversal; now they speculate, come back
verified with exactly plain decoding's greedy tokens, and blame nobody honest, while a
liar in a speculating chain is still caught."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from butterfly.dataplane.stage_server import StageServer
from butterfly.protocol.proof import fingerprint, head
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import BelowFingerprintStageServer, CorruptStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask, SamplingParams

pytestmark = pytest.mark.timeout(180)
EDIT = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "# the same, renamed:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
)
NEW = 24


def settings(chunk: int = 1) -> dict[str, object]:
    return {
        "coordination.heartbeat_interval_ms": 10,
        "byzantine.verification": "audit",
        "byzantine.fingerprint_chunk": chunk,
        "generation.speculative.mode": "ngram",
        "generation.speculative.k": 4,
    }


def test_a_fingerprints_head_is_that_of_the_rows_it_keeps() -> None:
    import torch

    rows = torch.randn(1, 5, 16)
    assert head(fingerprint(rows, 4, 1), 3) == fingerprint(rows[:, :3], 4, 1)
    assert head(fingerprint(rows, 4, 2), 4) == fingerprint(rows[:, :4], 4, 2)
    assert head(fingerprint(rows, 4, 2), 3) is None  # a chunk would be cut
    assert head(fingerprint(rows, 4, 1), 6) is None and head(fingerprint(rows, 4, 1), 0) is None


async def _serve(
    model: Path,
    data: Path,
    *,
    n: int,
    liars: dict[int, type[StageServer]] | None = None,
    chunk: int = 1,
) -> tuple[list[tuple[list[int], str, float]], list[int], set[NodeId]]:
    """(tokens, verified, traversals) of each of two EDIT requests, the plain decoding's
    tokens, and the nodes evicted."""
    codec = TextCodec.load(model)
    ids = tuple(codec.encode(EDIT))
    plain = list(generate([load_stage(model)], ids, NEW, stop_ids=codec.eos_ids))
    got = []
    f = (n - 1) // 3
    async with InProcessCluster(
        model, n, data, f=f, settings=settings(chunk), stage_servers=liars or {}
    ) as c:
        await c.first_plan()
        for i in range(2):
            task = InferenceTask(RequestId(f"spec-{i}"), input_ids=ids, max_new_tokens=NEW)
            run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
            await c.until(run.done, f"request {i} to finish", beats=3000)
            result = run.result()
            got.append((list(result.output_ids), result.verified, result.timings["traversals"]))
        for _ in range(20):  # time for a wrongful eviction to show, were one under way
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        return got, plain, set(c.gateway.plans.evicted)


async def test_audited_requests_speculate_and_come_back_verified_blaming_nobody(
    tiny_model: Path, tmp_path: Path
) -> None:
    """n = 6, f = 1, chain 0 -> 1 -> 2: fewer traversals than tokens, plain decoding's
    tokens, verified by the audit, and nobody evicted."""
    got, plain, evicted = await _serve(tiny_model, tmp_path, n=6)
    for tokens, verified, traversals in got:
        assert tokens == plain and verified == "audit"
        assert traversals < len(tokens), "no draft was confirmed"
    assert not evicted


async def test_with_chunks_of_several_positions_audited_requests_decode_one_at_a_time(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A record of chunks of 4 positions cannot leave out a rejected draft's rows: such
    a cluster's audited requests take one token per traversal, and are verified."""
    got, plain, evicted = await _serve(tiny_model, tmp_path, n=4, chunk=4)
    for tokens, verified, traversals in got:
        assert tokens == plain and verified == "audit"
        assert traversals == len(tokens)  # one token per traversal, the prompt's included
    assert not evicted


@pytest.mark.parametrize("liar", [CorruptStageServer, BelowFingerprintStageServer])
async def test_a_liar_in_a_speculating_chain_is_evicted_and_never_an_honest_node(
    tiny_model: Path, tmp_path: Path, liar: type[StageServer]
) -> None:
    got, plain, evicted = await _serve(tiny_model, tmp_path, n=6, liars={1: liar})
    for tokens, verified, _ in got:
        assert tokens == plain and verified == "audit"
    assert evicted == {NodeId(1)}


async def test_sampled_speculation_under_the_audit_is_verified(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Sampled tokens drawn through the acceptance rule are ones the honest distribution
    allows: verified, nobody blamed, and the seed's own tokens each time, the second
    asking for logprobs (which it drafts with, its scores read off the verify rows)."""
    codec = TextCodec.load(tiny_model)
    ids = tuple(codec.encode(EDIT))
    sampled = SamplingParams(temperature=0.7, seed=11)
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings()) as c:
        await c.first_plan()
        outs = []
        for i in range(2):
            task = InferenceTask(
                RequestId(f"s-{i}"),
                input_ids=ids,
                max_new_tokens=NEW,
                sampling=replace(sampled, logprobs=i or None),
            )
            run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
            await c.until(run.done, f"request {i} to finish", beats=3000)
            result = run.result()
            assert result.verified == "audit", result.timings
            outs.append(result.output_ids)
        assert outs[0] == outs[1] and not c.gateway.plans.evicted
        assert [s.token for s in result.logprobs] == list(outs[1])
