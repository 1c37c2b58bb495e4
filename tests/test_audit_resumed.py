"""The audit where a request went on from caches, or speculated, and a node lied
(found by a review of the twenty-third session's changes): nobody honest is blamed,
every liar whose lie shows is caught, and no request fails for a lie.

- A plan that went on from caches built before it (a recovery resumed on them, or a
  standby on a KV copy) is audited as if those positions were honest: a contradiction
  there convicts nobody (an honest receiver of a liar's earlier rows was evicted, and a
  standby that resumed on a liar's poisoned copy); where it shows in the chain's own
  steps, the request is computed again from fresh caches.
- A record whose fingerprint cannot be cut to a verify step's kept rows (chunks of 2)
  is judged as a weak one: its signer is convicted by the rows it sent (such a liar
  left every speculating request unverified and was never evicted).
- A last stage answering a verify step with fewer rows than asked is convicted at
  once (the request failed on it).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from pathlib import Path

import pytest
import torch

from butterfly.dataplane.proving import RecordMismatch
from butterfly.dataplane.stage_server import Outbound, StageServer
from butterfly.net.framing import Envelope
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import (
    BelowFingerprintStageServer,
    CorruptStageServer,
    SignsShape,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import StageStep

pytestmark = pytest.mark.timeout(180)
PROMPT = "Once upon a time"
EDIT = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "# the same, renamed:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
)


def settings(speculative: str = "off", **more: object) -> dict[str, object]:
    return {
        "coordination.heartbeat_interval_ms": 10,
        "byzantine.verification": "audit",
        "generation.speculative.mode": speculative,
        "generation.speculative.k": 4,
        **more,
    }


async def settle(c: InProcessCluster) -> set[NodeId]:
    """Time for a wrongful eviction to show, were one under way; the evicted."""
    for _ in range(60):
        c.hub.tick(0.1)
        await asyncio.sleep(0.005)
    return set(c.gateway.plans.evicted)


_prompt_step: contextvars.ContextVar[bool] = contextvars.ContextVar("prompt", default=False)


class PromptOnlyBelowFingerprint(BelowFingerprintStageServer):
    """`BelowFingerprintStageServer`'s lie on the prompt's step only."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        return super().tamper(out) if _prompt_step.get() else out

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        token = _prompt_step.set(0 in msg.starts)
        try:
            return await super().compute(msg, epoch, payload, route)
        finally:
            _prompt_step.reset(token)


class PoisonedCopyStageServer(StageServer):
    """Honest on every step; the KV copies it ships its standbys are scaled by -3."""

    def kv_deltas(self, request_ids: tuple[RequestId, ...]) -> list[Outbound]:
        return [
            Outbound(o.peer, o.msg, encode_tensor(decode_tensor(o.payload) * -3.0))
            for o in super().kv_deltas(request_ids)
        ]


class ChunkTwoCorrupt(SignsShape, CorruptStageServer):
    """Corrupts what it sends, and signs fingerprints of chunks of 2 positions."""

    sign_chunk = 2


class OneRowStageServer(StageServer):
    """As the last stage, answers a verify step (every row asked) with its last row."""

    async def on_step(self, env: Envelope, route: tuple[NodeId, ...] = ()) -> Outbound:
        msg = env.msg
        last = self.stage is not None and self.stage.is_last
        if isinstance(msg, StageStep) and not msg.last_only and last:
            env = dataclasses.replace(env, msg=dataclasses.replace(msg, last_only=True))
        return await super().on_step(env, route)


async def test_an_honest_receiver_of_a_liars_rows_in_an_earlier_plan_is_not_blamed(
    tiny_model: Path, tmp_path: Path
) -> None:
    """n = 7, chain 0 -> 1 -> 2: node 1 lies on the prompt's step only; node 3, a
    standby of the gateway's range, dies at token 4, the plan moves, and the request
    goes on from the chain's caches. The first plan's audit convicts node 1; the
    second's found node 2, whose cache holds node 1's prompt rows, contradicting the
    re-execution, and convicted it too. (Where the kill cost the first plan a step's
    records, its audit convicts nobody, and the answer comes back unverified.)"""
    assert await _standby_3_dies(tiny_model, tmp_path, {1: PromptOnlyBelowFingerprint}, 16, 4) <= {
        NodeId(1)
    }


async def _standby_3_dies(
    model: Path, data: Path, liars: dict[int, type[StageServer]], new: int, at: int
) -> set[NodeId]:
    """n = 7, chain 0 -> 1 -> 2 and `liars`: node 3, a standby of the gateway's range,
    dies at token `at` of a request of `new` tokens; the plan moves, and the request
    goes on from the chain's caches. Its answer is right or unverified; the evicted."""
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    plain = list(generate([load_stage(model)], ids, new))
    async with InProcessCluster(model, 7, data, f=1, settings=settings(), stage_servers=liars) as c:
        plan = await c.first_plan()
        assert [int(n) for n, _ in plan.stages] == [0, 1, 2]
        task = InferenceTask(RequestId("x"), input_ids=ids, max_new_tokens=new)
        result = await c.infer_killing(task, 3, at=at)
        assert result.verified == "none" or list(result.output_ids) == plain
        return await settle(c)


class CorruptAfterThePlanMoves(CorruptStageServer):
    """Honest under the first plan; corrupts what it sends under any later one."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        return super().tamper(out) if self.epoch > 1 else out


async def test_a_node_that_kept_its_range_and_lies_after_the_plan_moved_is_caught(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 2, the last of 0 -> 1 -> 2, lies once node 3's death has moved the plan; its
    range and caches stay its own, and the first plan's audit found everything right:
    its contradiction under the second plan is its own doing, and it is evicted."""
    evicted = await _standby_3_dies(tiny_model, tmp_path, {2: CorruptAfterThePlanMoves}, 64, 2)
    assert evicted == {NodeId(2)}


@pytest.mark.parametrize("speculative", ["off", "ngram"])
async def test_a_standby_resuming_on_a_liars_kv_copy_is_not_blamed(
    tiny_model: Path, tmp_path: Path, speculative: str
) -> None:
    """Node 1 computes honestly and ships its standby, node 4, poisoned KV copies; it
    dies at token 6 and node 4 goes on from the copy. Its contradictions convicted it;
    then, blamed on nobody, they came back as the answer, unverified and wrong. Now the
    request is computed again from fresh caches: the unsplit model's tokens, verified."""
    ids = tuple(TextCodec.load(tiny_model).encode(PROMPT))
    plain = list(generate([load_stage(tiny_model)], ids, 16))
    more = {"coordination.checkpoint_frequency": 1}
    async with InProcessCluster(
        tiny_model,
        7,
        tmp_path,
        f=1,
        settings=settings(speculative, **more),
        stage_servers={1: PoisonedCopyStageServer},
    ) as c:
        await c.first_plan()
        task = InferenceTask(RequestId("x"), input_ids=ids, max_new_tokens=16)
        result = await c.infer_killing(task, 1, at=6)
        assert list(result.output_ids) == plain
        assert result.verified == "audit"
        assert await settle(c) <= {NodeId(1)}


async def test_the_run_after_a_withdrawn_answer_is_audited_whatever_the_fraction_draws(
    tiny_model: Path, tmp_path: Path
) -> None:
    """As above with byzantine.audit_fraction = 0.5: the first run draws an audit, which
    withdraws its answer; the run after it came back `none` whenever its own draw said
    so (a review), though the answer before it was wrong. It is audited regardless."""
    ids = tuple(TextCodec.load(tiny_model).encode(PROMPT))
    plain = list(generate([load_stage(tiny_model)], ids, 16))
    more = {"coordination.checkpoint_frequency": 1, "byzantine.audit_fraction": 0.5}
    async with InProcessCluster(
        tiny_model,
        7,
        tmp_path,
        f=1,
        settings=settings(**more),
        stage_servers={1: PoisonedCopyStageServer},
    ) as c:
        await c.first_plan()
        drawn: list[float] = []

        def draw() -> float:  # audited the first time, never again were it drawn
            drawn.append(0.99 if drawn else 0.0)
            return drawn[-1]

        c.gateway.engine._audit_draw = draw
        task = InferenceTask(RequestId("x"), input_ids=ids, max_new_tokens=16)
        result = await c.infer_killing(task, 1, at=6)
        assert list(result.output_ids) == plain
        assert result.verified == "audit"
        assert drawn == [0.0]  # the run after the withdrawn one drew nothing


async def _edits(
    model: Path, data: Path, n: int, liar: type[StageServer], speculative: str, requests: int
) -> set[NodeId]:
    """`requests` greedy EDIT requests on n nodes with `liar` as node 1, each right or
    unverified (none fails); the evicted."""
    ids = tuple(TextCodec.load(model).encode(EDIT))
    plain = list(generate([load_stage(model)], ids, 24))
    async with InProcessCluster(
        model, n, data, f=1, settings=settings(speculative), stage_servers={1: liar}
    ) as c:
        await c.first_plan()
        for i in range(requests):
            task = InferenceTask(RequestId(f"r{i}"), input_ids=ids, max_new_tokens=24)
            result = await c.infer(task, beats=3000)
            assert result.verified == "none" or list(result.output_ids) == plain
        return await settle(c)


@pytest.mark.parametrize("speculative", ["off", "ngram"])
async def test_a_liar_signing_chunks_a_verify_step_cuts_is_caught(
    tiny_model: Path, tmp_path: Path, speculative: str
) -> None:
    evicted = await _edits(tiny_model, tmp_path, 6, ChunkTwoCorrupt, speculative, 2)
    assert evicted == {NodeId(1)}


@pytest.mark.parametrize("speculative", ["off", "ngram"])
async def test_a_last_stage_answering_a_verify_step_with_one_row_is_caught(
    tiny_model: Path, tmp_path: Path, speculative: str
) -> None:
    """n = 4: node 1 is the last stage. No request fails for it (nor is verified wrong)."""
    evicted = await _edits(tiny_model, tmp_path, 4, OneRowStageServer, speculative, 1)
    assert evicted == ({NodeId(1)} if speculative == "ngram" else set())


class RefuseThenOneRow(OneRowStageServer):
    """As the last stage, refuses each verify step's first run (a false RecordMismatch),
    and answers its relayed re-run with its last row only."""

    refused: frozenset[tuple[str, int]] = frozenset()

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        last = self.stage is not None and self.stage.is_last
        key = (str(msg.request_ids[0]), msg.steps[0])
        if last and max(msg.lengths) > 1 and 0 not in msg.starts and key not in self.refused:
            self.refused = self.refused | {key}  # this node's own, not the class's
            raise RecordMismatch(f"step {msg.steps} input does not match (a false claim)")
        return await super().compute(msg, epoch, payload, route)


@pytest.mark.parametrize("speculative", ["off", "ngram"])
async def test_a_relayed_verify_step_answered_with_one_row_is_caught(
    tiny_model: Path, tmp_path: Path, speculative: str
) -> None:
    """Node 1, the last stage, refuses each verify step once (a false record mismatch,
    which costs nothing: the gateway relays it) and answers the relayed run with one
    row: the relay had forgotten what the step asked for, and the request failed."""
    evicted = await _edits(tiny_model, tmp_path, 4, RefuseThenOneRow, speculative, 1)
    assert evicted == ({NodeId(1)} if speculative == "ngram" else set())
