"""Liars that play on the gap between what they sign and what they send, in one process.

Whole nodes (butterfly.testing.inprocess) with one stage server swapped for a liar of
butterfly.testing.liars, in `audit` and in `replicate` mode. Each request must come back
with the unsplit model's tokens and never a wrong answer marked verified, no request may
fail, the liar must end up evicted by an agreed EvictNode on every node (one that only
withholds its work, out of the plans for a while: nothing proves it lied), and no honest
node may be. tests/test_adversary_bytes.py keeps one of these on real processes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import (
    AuditFailsStageServer,
    BelowFingerprintStageServer,
    ColludingStageServer,
    CorruptStageServer,
    FalseAccuserStageServer,
    HonestFingerprintStageServer,
    IntermittentStageServer,
    OmitRecordsStageServer,
    PoisonedAuditStageServer,
    PoisonedInputStageServer,
    SignHonestSendCorruptStageServer,
    SilentStageServer,
    WeakFingerprintStageServer,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.data import InputsHeld, InputsQuery, StageStep

pytestmark = pytest.mark.timeout(120)
PROMPTS = ("Once upon a time", "Butterfly")
NEW = 12


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> dict[str, list[int]]:
    codec = TextCodec.load(tiny_model)
    stage = load_stage(tiny_model)
    return {
        p: list(generate([stage], codec.encode(p), NEW, stop_ids=codec.eos_ids)) for p in PROMPTS
    }


def _task(model: Path, prompt: str, n: int) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode(prompt))
    return InferenceTask(RequestId(f"adv-{n}"), input_ids=ids, max_new_tokens=NEW)


async def _serve_through_a_liar(
    model: Path,
    data: Path,
    expected: dict[str, list[int]],
    *,
    n: int,
    liars: dict[int, type[StageServer]],
    mode: str,
    chain: set[int] | None = None,
    honest_faults: frozenset[int] = frozenset(),
    withholding: bool = False,
    more: dict[str, object] | None = None,
) -> None:
    """`chain`: the liars that must be chain nodes (default all); `honest_faults`: the
    nodes composed with a fault that is no lie (they must not be evicted); `withholding`:
    the liars only leave work unanswered, and must end up suspended (out of the plans,
    not evicted); `more`: settings besides."""
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": mode}
    settings.update(more or {})
    f = (n - 1) // 3
    async with InProcessCluster(model, n, data, f=f, settings=settings, stage_servers=liars) as c:
        gw = c.gateway
        first = await c.first_plan()
        assert first is not None and (set(liars) if chain is None else chain) <= set(first.nodes)
        for i, prompt in enumerate(PROMPTS):
            run = asyncio.create_task(gw.engine.run(_task(model, prompt, i), lambda t: None))
            await c.until(run.done, f"request {i} to finish", beats=2000)
            result = run.result()  # no request fails
            verified = result.verified != "none"
            assert list(result.output_ids) == expected[prompt] or not verified, "wrong, verified"
            assert verified, f"request {i} not verified ({result.timings})"
        liar_ids = {NodeId(n) for n in liars if n not in honest_faults}
        if withholding:
            await c.until(lambda: all(map(gw.recovery.suspended, liar_ids)), "suspension")
        else:
            await c.until(
                lambda: all(liar_ids <= set(node.plans.evicted) for node in c.nodes),
                "agreed eviction",
            )
        for _ in range(20):  # time for a wrongful eviction to show, were one under way
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        for node in c.nodes:  # no honest node evicted, nor a withholding one
            assert set(node.plans.evicted) == (set() if withholding else liar_ids)
        plan = gw.stage_server.plan
        assert plan is not None
        assert not liar_ids & {*plan.nodes, *(n for n, _ in plan.replicas)}


LAST = 1  # n = 4, f = 1: the chain is 0 (the gateway) -> 1, standbys 2 and 3
LIARS = {
    "sign-honest-send-corrupt": SignHonestSendCorruptStageServer,
    "omit-records": OmitRecordsStageServer,
    "intermittent": IntermittentStageServer,
    "corrupt": CorruptStageServer,
    "false-accuser": FalseAccuserStageServer,  # frames node 0, the gateway's own stage
    # signs lying bytes' hashes beside another fingerprint: of its honest output, or of
    # one value per position (found by a review: their answers came back verified)
    "honest-fingerprint": HonestFingerprintStageServer,
    "weak-fingerprint": WeakFingerprintStageServer,
}


@pytest.mark.parametrize("mode", ["audit", "replicate"])
@pytest.mark.parametrize("kind", sorted(LIARS))
async def test_a_lying_last_stage_is_evicted_and_every_answer_is_right(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], kind: str, mode: str
) -> None:
    await _serve_through_a_liar(
        tiny_model, tmp_path, expected, n=4, liars={LAST: LIARS[kind]}, mode=mode
    )


MIDDLE = 1  # n = 6, f = 1: the chain is 0 (the gateway) -> 1 -> 2


@pytest.mark.parametrize("mode", ["audit", "replicate"])
@pytest.mark.parametrize("kind", ["sign-honest-send-corrupt", "omit-records", "honest-fingerprint"])
async def test_a_lying_middle_stage_is_evicted_and_never_its_honest_receiver(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], kind: str, mode: str
) -> None:
    """Node 2, the honest next stage, refuses bytes its sender's records do not vouch
    for; the gateway relays the step through itself and convicts the sender alone."""
    await _serve_through_a_liar(
        tiny_model, tmp_path, expected, n=6, liars={MIDDLE: LIARS[kind]}, mode=mode
    )


async def test_an_auditor_whose_re_run_matches_the_records_and_is_wrong_is_caught(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """Node 4, the middle range's standby, answers its audits with re-runs that match the
    chain's fingerprints and are wrong elsewhere: the last stage's auditor, re-running on
    that input, disagreed with the honest last stage, and the gateway's re-execution on
    the same input convicted it (a review). The dispute now retraces its input from the
    gateway's own stage: node 4 is evicted, and nobody else."""
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=6,
        liars={4: PoisonedAuditStageServer},
        mode="audit",
        chain=set(),
    )


async def test_an_auditor_and_a_chain_node_poisoning_alike_are_both_caught(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """n = 9, f = 2, chain 0 -> 1 -> 2 with holders (0, 3, 6), (1, 4, 7), (2, 5, 8):
    node 4 re-runs stage 1 for the audit below its fingerprints' reach, and node 2, the
    last stage, computes on its input poisoned the same way. Both re-runs of stage 1
    matched the records, node 4's was fed on, and node 2's output agreed with it: a wrong
    answer came back verified (a review). Now the re-runs must agree with each other
    before one is fed on: both liars are evicted and every answer is right."""
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=9,
        liars={4: PoisonedAuditStageServer, 2: PoisonedInputStageServer},
        mode="audit",
        chain={2},
    )


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_a_last_stage_hiding_another_token_below_its_fingerprint_is_caught(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], mode: str
) -> None:
    """With `fingerprint_top_k` 1 agreed, the liar's one-value fingerprints are of the
    cluster's shape and describe its bytes; where a row's largest logit by magnitude is
    negative it raises another above the best without showing it. The audit holds a
    greedy request's tokens to the re-executed logits too: without that, every such
    answer came back wrong and marked verified."""
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=4,
        liars={LAST: WeakFingerprintStageServer},
        mode=mode,
        more={"byzantine.fingerprint_top_k": 1},
    )


class _StallsOnce(StageServer):
    """Honest, but its first decode step takes longer than the step timeout."""

    stalled = False

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        if max(msg.lengths) == 1 and not self.stalled:
            self.stalled = True
            await asyncio.sleep(1.5)
        return await super().compute(msg, epoch, payload, route)


async def test_the_gateways_own_slow_stage_is_not_charged_to_the_next_node(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """The gateway holds the first stage of 0 -> 1; its own step stalls past the step
    timeout once. The step's timeout was charged to node 1, the one other node of the
    chain (a review: three such stalls, far apart, evicted it); the step is re-run one
    node at a time now, and node 1 answers its own hop."""
    quick = {"network.step_timeout_ms": 1000, "byzantine.max_step_timeouts": 1}
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=4,
        liars={0: _StallsOnce},
        mode="audit",
        honest_faults=frozenset({0}),
        more=quick,
    )


class _TorchBusyOnce(StageServer):
    """Honest, but its torch thread is busy for 1.5 s once, at its fifth decode step (a
    long job on a loaded CPU): the steps queued behind it answer late."""

    decode_steps = 0
    busy: asyncio.Future[None] | None = None

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        if max(msg.lengths) == 1:
            self.decode_steps += 1
            if self.decode_steps == 5:
                self.busy = asyncio.ensure_future(self._torch.run(lambda: time.sleep(1.5)))
                await asyncio.sleep(0.01)
        return await super().compute(msg, epoch, payload, route)


async def test_steps_rescued_by_the_one_at_a_time_re_run_are_still_verified(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """Node 2, the last of 0 -> 1 -> 2, is busy past the step timeout once while four
    requests run in one batch: each step is re-run one node at a time and answered, and
    the batch's answer comes after. Its records, signed over a batch's bytes, were mixed
    with the re-run's one-row ones, and every request came back unverified (a review);
    nobody may be evicted either."""
    settings = {
        "coordination.heartbeat_interval_ms": 10,
        "byzantine.verification": "audit",
        "network.step_timeout_ms": 1000,
    }
    liars: dict[int, type[StageServer]] = {2: _TorchBusyOnce}
    async with InProcessCluster(
        tiny_model, 6, tmp_path, f=1, settings=settings, stage_servers=liars
    ) as c:
        gw = c.gateway
        plan = await c.first_plan()
        assert plan is not None and plan.nodes[-1] == NodeId(2)
        prompts = [*PROMPTS, *PROMPTS]
        runs = [
            asyncio.create_task(gw.engine.run(_task(tiny_model, p, i), lambda t: None))
            for i, p in enumerate(prompts)
        ]
        await c.until(lambda: all(r.done() for r in runs), "the requests", beats=2000)
        for prompt, run in zip(prompts, runs, strict=True):
            result = run.result()
            assert list(result.output_ids) == expected[prompt]
            assert result.verified == "audit", result.timings
        assert all(not node.plans.evicted for node in c.nodes)
        busy = c.nodes[2].stage_server
        assert isinstance(busy, _TorchBusyOnce) and busy.decode_steps >= 5


@pytest.mark.parametrize("kind", ["below-fingerprint", "weak-fingerprint"])
async def test_a_middle_stage_lying_below_its_records_is_evicted_and_never_its_receiver(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], kind: str
) -> None:
    """Node 1, the middle of 0 -> 1 -> 2, halves all but each position's largest values
    and signs exactly what it sends: with fingerprints of the cluster's shape, which
    match every honest re-run (the audit convicted honest node 2, which computed on the
    lie: a review), or of one value per position, weaker than the cluster's (the audit
    stopped there, the liar never evicted). Node 2 keeps what it received; the gateway
    asks for it before convicting it, finds bytes that node 1 signed and the
    re-execution contradicts, and evicts node 1 alone."""
    liar = {
        "below-fingerprint": BelowFingerprintStageServer,
        "weak-fingerprint": WeakFingerprintStageServer,
    }
    await _serve_through_a_liar(
        tiny_model, tmp_path, expected, n=6, liars={MIDDLE: liar[kind]}, mode="audit"
    )


class _CorruptShowingNothing(CorruptStageServer):
    """Corrupts what it sends, signs it, and when asked what it received shows nothing."""

    def inputs_held(self, msg: InputsQuery, payload: bytes = b"") -> tuple[InputsHeld, bytes]:
        return InputsHeld(msg.request_id, self.node, (), ()), b""


async def test_a_lying_stage_that_shows_nothing_it_received_is_judged_on_what_was_sent(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """Node 2, the last of 0 -> 1 -> 2, lies and will not show what it received; node 1,
    honest, shows what it sent: node 2 is judged on that, and evicted alone."""
    await _serve_through_a_liar(
        tiny_model, tmp_path, expected, n=6, liars={2: _CorruptShowingNothing}, mode="audit"
    )


class _WithholdsFirstAttempts(StageServer):
    """Holds back the first attempt of every decode step it is sent, and answers when the
    step comes again."""

    seen: frozenset[tuple[tuple[RequestId, ...], tuple[int, ...]]] = frozenset()

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        key = (msg.request_ids, msg.steps)
        if max(msg.lengths) == 1 and key not in self.seen:
            self.seen = self.seen | {key}  # this node's own, not the class's
            await asyncio.Event().wait()
        return await super().compute(msg, epoch, payload, route)


async def test_a_node_holding_back_first_attempts_after_the_gateways_stage_is_charged(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """The chain is 0 (the gateway) -> 1; node 1 holds back each step until it is re-run.
    Re-run one node at a time, it answered, and was never charged (a review): a step the
    gateway handed on with at least half the step timeout left is node 1's to answer."""
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=4,
        liars={LAST: _WithholdsFirstAttempts},
        mode="audit",
        withholding=True,
        more={"network.step_timeout_ms": 500},
    )


async def test_a_silent_node_with_a_high_timeout_limit_is_suspended_before_requests_fail(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """`byzantine.max_step_timeouts` 9, over a request's 8 recoveries: each step node 1
    held back used one up, and both requests failed as it was being evicted (a review).
    A step held back by a node that stays in the plan counts toward its eviction only."""
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=4,
        liars={LAST: SilentStageServer},
        mode="audit",
        withholding=True,
        more={"network.step_timeout_ms": 300, "byzantine.max_step_timeouts": 9},
    )


async def test_a_middle_stage_that_withholds_every_step_is_found_and_suspended(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """Node 1 (the middle of 0 -> 1 -> 2) forwards nothing: down the chain any of its
    nodes might have held a step back, and nobody was charged while every request failed
    (a review). The gateway now re-runs a timed-out step one node at a time, and node 1's
    own hop times out."""
    quick = {"network.step_timeout_ms": 1000, "byzantine.max_step_timeouts": 1}
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=6,
        liars={MIDDLE: SilentStageServer},
        mode="audit",
        withholding=True,
        more=quick,
    )


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_a_receiver_that_frames_its_sender_is_evicted_instead(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], mode: str
) -> None:
    """Node 2 (the last stage) claims that node 1's bytes do not match its records: the
    gateway relays the step, node 1's bytes check out, node 2 refuses them again and is
    the one evicted."""
    await _serve_through_a_liar(
        tiny_model, tmp_path, expected, n=6, liars={2: FalseAccuserStageServer}, mode=mode
    )


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_f_colluding_liars_are_all_evicted(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]], mode: str
) -> None:
    """n = 7, f = 2: node 1 (the last stage) and node 3 (another holder of its range:
    its first auditor, and a replicate lane of its own) tell the same signed lie. The
    audit asks every other holder of a range, so the honest one (node 5) disagrees."""
    colluders: dict[int, type[StageServer]] = {1: ColludingStageServer, 3: ColludingStageServer}
    await _serve_through_a_liar(
        tiny_model, tmp_path, expected, n=7, liars=colluders, mode=mode, chain={1}
    )


async def test_an_auditor_that_could_not_run_is_not_convicted(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """Node 3, the auditor of the last stage's range, answers every audit with an
    error (out of memory): the gateway re-executes instead; nobody is evicted."""
    await _serve_through_a_liar(
        tiny_model,
        tmp_path,
        expected,
        n=4,
        liars={3: AuditFailsStageServer},
        mode="audit",
        chain=set(),
        honest_faults=frozenset({3}),
    )


async def test_without_verification_no_record_is_required_and_nobody_is_convicted(
    tiny_model: Path, tmp_path: Path, expected: dict[str, list[int]]
) -> None:
    """`byzantine.verification = "none"`: nodes sign no records, so the gateway must not
    ask for them (an honest chain would otherwise be convicted on every step)."""
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "none"}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        gw = c.gateway
        await c.first_plan()
        run = asyncio.create_task(gw.engine.run(_task(tiny_model, PROMPTS[0], 0), lambda t: None))
        await c.until(run.done, "the request to finish", beats=2000)
        result = run.result()
        assert list(result.output_ids) == expected[PROMPTS[0]]
        assert result.verified == "none"
        assert all(not node.plans.evicted for node in c.nodes)
