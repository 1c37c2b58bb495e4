"""An auditor that fails mid-audit (frozen, cut off: its connection stays open, no answer
comes) no longer holds the request's answer for `network.step_timeout_ms` (60 s by
default): the gateway stops waiting once its failure detector declares the auditor
failed, counts it as an auditor that could not answer (nobody blamed), and its own
re-execution judges the records (`dataplane.routes.AuditAsk`).

DESIGN.md section 3: "any node may stop, be killed, or be cut off at any moment", and
"When a node fails mid-request, its stage moves to another node and the request
finishes with exactly the tokens it would have produced without the failure". A chain
node failing mid-step costs a re-plan; an auditor failing mid-audit cost the whole step
timeout (a review).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from butterfly.dataplane.routes import AuditAsk
from butterfly.dataplane.stage_server import StageServer
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.errors import StageLost
from butterfly.types.ids import NodeId, RequestId, StageIndex
from butterfly.types.tasks import InferenceTask, SamplingParams
from butterfly.types.wire.data import AuditReply, AuditRequest

pytestmark = pytest.mark.timeout(120)


class Silent:
    """A transport whose peer never answers (its asks end on their timeout only)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def ask(self, node, msg, payload, *, timeout):  # type: ignore[no-untyped-def]
        try:
            await asyncio.sleep(timeout)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("waited for the whole step timeout")


async def never_declared(nodes: tuple[NodeId, ...], why: str) -> None:
    raise AssertionError(f"{nodes} declared unresponsive: {why}")


async def test_an_ask_to_an_auditor_declared_failed_ends_without_blame() -> None:
    down: set[NodeId] = set()
    silent = Silent()
    timeouts = StepTimeouts(
        gateway=NodeId(0),
        limit=lambda: 1,
        status=lambda node: "failed" if node in down else "healthy",
        declare=never_declared,
    )

    async def local(msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        raise AssertionError("asked itself")

    asks = AuditAsk(
        node=NodeId(0),
        local=local,
        local_inputs=lambda query: (_ for _ in ()).throw(AssertionError()),
        transport=silent,  # type: ignore[arg-type]
        timeouts=timeouts,
        timeout_s=lambda: 60.0,
        failed=lambda node: node in down,
    )
    request = AuditRequest(RequestId("r"), StageIndex(1), 2, 4)
    asking = asyncio.create_task(asks(NodeId(3), request, b""))
    for _ in range(5):  # healthy: still waiting
        await asyncio.sleep(0.01)
    assert not asking.done()
    down.add(NodeId(3))
    with pytest.raises(StageLost, match="node 3 was declared failed during the audit of r"):
        await asyncio.wait_for(asking, 30)  # bounded; 60 s is the step timeout
    assert silent.cancelled == 1  # the ask itself is given up
    assert timeouts.recent == {}  # a crash is the detector's, not a timeout to count
    with pytest.raises(StageLost):  # already failed: not asked to wait at all
        await asyncio.wait_for(asks(NodeId(3), request, b""), 30)


KILL: dict[str, object] = {"fire": None}


class CutOffWhileAuditing(StageServer):
    """An honest node, cut off the moment it is first asked to audit once armed."""

    async def audit(self, msg, payload):  # type: ignore[no-untyped-def]
        fire, KILL["fire"] = KILL["fire"], None
        if fire is not None:
            fire()  # type: ignore[operator]
        return await super().audit(msg, payload)


async def test_a_request_whose_auditor_is_cut_off_mid_audit_finishes_on_the_detectors_word(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """n = 4, f = 1: node 3 holds node 1's range and audits it; it is cut off as it is
    asked. The request finishes with its tokens once the detector declares node 3
    failed, long before the 60 s step timeout the audit's ask waited for."""
    ids = tuple(TextCodec.load(tiny_model).encode(" ".join(f"word{i}" for i in range(20))))
    sampling = SamplingParams(temperature=0.9, seed=3)
    settings = {"coordination.heartbeat_interval_ms": 10}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers={3: CutOffWhileAuditing}
    ) as c:
        plan = await c.first_plan()
        assert plan.nodes == (0, 1) and NodeId(3) in {n for n, _ in plan.replicas}
        ref = await c.infer(
            InferenceTask(RequestId("ref"), ids, max_new_tokens=12, sampling=sampling)
        )
        assert ref.verified == "audit"
        KILL["fire"] = lambda: c.kill(3)
        task = InferenceTask(RequestId("k"), ids, max_new_tokens=12, sampling=sampling)
        run = asyncio.create_task(c.gateway.engine.run(task, lambda _: None))
        deadline = time.monotonic() + 30.0  # bounded, half the step timeout
        try:
            while not run.done() and time.monotonic() < deadline:
                c.hub.tick(0.1)
                await asyncio.sleep(0.005)
        finally:
            KILL["fire"] = None
        if not run.done():
            run.cancel()
        assert run.done() and not run.cancelled(), "still waiting for the cut-off auditor"
        assert NodeId(3) in c.gateway.recovery.failed
        assert list(run.result().output_ids) == list(ref.output_ids)
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("node 3 was declared failed during the audit of k" in m for m in said)
