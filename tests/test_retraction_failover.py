"""A gateway that dies after an audit withdrew a request's tokens (a liar in the chain)
leaves its successor a checkpoint of the run that starts over, not of the withdrawn one.

DESIGN.md section 3: "evidence goes through PBFT to evict the node, and the affected
requests are re-run"; "the canonical checkpoint of a generation ... replicated to the
other gateway-capable nodes, so a gateway's death loses nothing". The withdrawn run's
checkpoint stayed on the standby until the re-run's first one replaced it, so a
successor resumed the liar's tokens and completed the request with them (sampled, even
`verified: "audit"`: its audit holds sampled tokens only to what honest logits could
have drawn). The engine now saves an empty checkpoint of the next attempt as it retracts
(`store.Checkpoint.attempt`), before it waits for the eviction.

n = 4, f = 1, gateways (0, 2), node 1 a chain node that skews every activation,
checkpoint_frequency 4, 30 sampled tokens: the first run's tokens reach node 2, the
audit convicts node 1, node 0 dies (at the retraction, before the eviction is agreed;
or at the re-run's first token), node 2 takes over.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import Retraction
from butterfly.schedule.state import TaskStatus
from butterfly.schedule.store import Checkpoint, TaskStore
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import CorruptStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask, SamplingParams
from butterfly.wiring.task_sync import sync_payload, take_all

pytestmark = pytest.mark.timeout(120)
NEW = 30
PROMPT = "Once upon a time"
SAMPLING = SamplingParams(temperature=0.8, seed=3)
SETTINGS = {
    "coordination.heartbeat_interval_ms": 10,
    "coordination.checkpoint_frequency": 4,
    "cluster.gateways": [0, 2],
}


@pytest.mark.parametrize("dies", ["at_the_retraction", "at_the_re_runs_first_token"])
async def test_a_gateway_dying_after_a_caught_lie_leaves_no_lie_to_resume(
    tiny_model: Path, tmp_path: Path, dies: str
) -> None:
    codec = TextCodec.load(tiny_model)
    ids = codec.encode(PROMPT)
    honest = list(
        generate([load_stage(tiny_model)], ids, NEW, sampling=SAMPLING, stop_ids=codec.eos_ids)
    )
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=SETTINGS, stage_servers={1: CorruptStageServer}
    ) as c:
        first, successor = c.nodes[0].gateway, c.nodes[2].gateway
        assert first is not None and successor is not None
        await c.until(lambda: first.scheduler is not None, "node 0 serving")
        assert first.scheduler is not None
        assert c.gateway.stage_server.plan is not None
        assert c.gateway.stage_server.plan.nodes == (0, 1)  # the liar is in the chain
        await first.scheduler.submit(
            InferenceTask(RequestId("t"), tuple(ids), max_new_tokens=NEW, sampling=SAMPLING)
        )
        withdrawn: list[int] = []

        def epoch() -> int:
            plan = c.gateway.stage_server.plan
            return plan.epoch if plan is not None else 0

        async def until_the_standby_starts_over_or_the_liar_is_evicted() -> None:
            """The gateway's death in the window before the eviction is agreed (the
            re-run waits for it): as soon as node 2 holds an empty checkpoint, or when
            the plan moves on without the liar, whichever comes first."""
            before = epoch()
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and epoch() == before:
                saved = successor.replicas.store.checkpoint("t")
                if saved is not None and not saved.tokens:
                    return
                await asyncio.sleep(0.001)

        async def kill_the_gateway() -> None:
            assert first.scheduler is not None
            retracted = False
            async for token in first.scheduler.stream("t"):
                if isinstance(token, Retraction):
                    retracted = True
                    if dies == "at_the_retraction":
                        await until_the_standby_starts_over_or_the_liar_is_evicted()
                        c.kill(0)
                        return
                elif not retracted:
                    withdrawn.append(token)  # type: ignore[arg-type]
                else:
                    c.kill(0)
                    return
            raise AssertionError("the request was never re-run after a retraction")

        watch = asyncio.create_task(kill_the_gateway())
        await c.until(watch.done, "the gateway's death", beats=3000)
        watch.result()
        assert len(withdrawn) >= 4 and withdrawn != honest[: len(withdrawn)]  # a lie withdrawn
        await c.until(lambda: successor.scheduler is not None, "node 2 takes over", beats=1000)

        def finished() -> bool:
            stored = successor.replicas.store.get("t")
            return stored is not None and stored.state.terminal

        await c.until(finished, "t finished on node 2", beats=3000)
        assert successor.scheduler is not None
        done = await successor.scheduler.wait("t", 10)
        assert done.state.status is TaskStatus.COMPLETED and done.result is not None
        assert list(done.result.output_ids) == honest, (
            f"completed (verified={done.result.verified!r}) with other tokens than the "
            f"honest ones, resumed from "
            f"{done.result.timings.get('resumed_from_checkpoint')} checkpointed tokens"
        )


def test_a_catch_up_carries_the_attempt_so_the_withdrawn_run_stays_withdrawn(
    tmp_path: Path,
) -> None:
    """A gateway that takes over pulls the standbys' checkpoints (`wiring.task_sync`):
    one that held only the withdrawn run's gets the empty one of the next attempt, and
    a late copy of the withdrawn run's does not replace it (attempt 0: a node from
    before attempts)."""
    task = InferenceTask(RequestId("t"), (1, 2, 3), max_new_tokens=8, sampling=SAMPLING)
    here, there = TaskStore(tmp_path / "here.sqlite"), TaskStore(tmp_path / "there.sqlite")
    try:
        for store in (here, there):
            store.copy(task)
        here.save_checkpoint(task.task_id, Checkpoint((4, 5, 6, 7), b"lie", 2))
        there.save_checkpoint(task.task_id, Checkpoint((), b"fresh", 2, attempt=1))
        take_all(here, NodeId(2), sync_payload(there.unfinished(), ()))
        assert here.checkpoint("t") == Checkpoint((), b"fresh", 2, 1)
        take_all(there, NodeId(0), b'[["t", "{}", [[4, 5, 6, 7, 8], "bGll", 2]]]')
        assert there.checkpoint("t") == Checkpoint((), b"fresh", 2, 1)
    finally:
        here.close()
        there.close()
