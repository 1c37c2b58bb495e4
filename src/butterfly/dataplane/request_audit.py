"""A finished request's audit: its steps grouped by the plan each ran under, each group
held to that plan's stages by `audit.Auditor`, the verdicts made one.

A request that went on after a failure ran under several plans; the steps a replay
computed again stay in the audit, because the tokens they led to were chosen from their
outputs. The engine records the steps as they are answered (`Steps`), and calls
`audit_request` once the request is finished.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from butterfly.dataplane.audit import Auditor, Verdict
from butterfly.dataplane.chosen import Chosen
from butterfly.dataplane.proving import Shape
from butterfly.metrics.events import Emit, Verification
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire.agreement import Proof

log = logging.getLogger(__name__)


@dataclass
class Steps:
    """The steps whose output a request used, as its audit reads them: the engine
    records each as it is answered (`used`) and each replay (`replayed_from`)."""

    # step -> (start, length) of its input positions
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    plans: dict[int, StagePlan] = field(default_factory=dict)  # step -> the plan it ran under
    every_row: set[int] = field(default_factory=set)  # its last stage answered every position
    # steps whose rows a replay computed again: their records are still audited (the
    # tokens they led to were chosen from their outputs), but a plan of such steps only
    # that nobody but their signers may re-run is passed over: later steps computed
    # every row again
    superseded: set[int] = field(default_factory=set)
    # a sampled request's tokens (by index) -> the probability its target distribution
    # gave each, as the gateway drew it (`Generation.drawn`)
    drawn: dict[int, float] = field(default_factory=dict)
    inherited: int = 0  # tokens taken from a dead gateway's checkpoint (`Chosen.inherited`)

    def used(self, step: int, start: int, length: int, plan: StagePlan | None) -> None:
        self.positions[step] = (start, length)
        if plan is not None:
            self.plans[step] = plan

    def replayed_from(self, start: int) -> None:
        """A replay computes every row from `start` again."""
        self.superseded.update(s for s, (begin, _) in self.positions.items() if begin >= start)


async def audit_request(
    auditor: Auditor,
    steps: Steps,
    records: Sequence[Proof],
    task: InferenceTask,
    result: InferenceResult,
    *,
    emit: Emit,
    on_liars: Callable[[tuple[NodeId, ...], str], Awaitable[None]],
    weakest: Shape | None = None,
    members: Collection[NodeId] | None = None,
) -> Verdict:
    """The gateway's audit of one finished request from the `records` its chains signed
    for its `steps`; liars found go to `on_liars`. A request whose steps ran under
    several plans (a node failed, the plan moved, and it went on from where its caches
    stood) is audited under each in turn: each plan's steps against that plan's stages,
    re-run by their other holders still among the `members` of the plan now (the one
    that failed is not asked). It came back unverified when only the last plan's records
    were read. A plan whose steps a replay superseded, all of them, and that cannot be
    audited (a range of it held by no current member but its signer) is passed over:
    the later steps computed every row again, and every chosen token is held to the
    re-executed logits of the last plan (`Chosen`). Any other reason a plan could not
    be verified still counts (passed over too, a weak record's lie came back verified:
    a review). A record fingerprinted more weakly than `weakest` leaves the request
    unverified (`Auditor.audit`): one value per position does not show another raised
    below it (a review). It blames nobody: a node that had not yet taken an agreed
    change of the shape signs so too."""
    request_id = task.task_id
    by_epoch: dict[int, tuple[StagePlan, dict[int, tuple[int, int]]]] = {}
    for step, where in sorted(steps.positions.items()):
        plan = steps.plans.get(step)
        if plan is None:
            return Verdict(False, reason=f"step {step} ran under no plan the gateway kept")
        by_epoch.setdefault(plan.epoch, (plan, {}))[1][step] = where
    sequence = list(task.input_ids) + list(result.output_ids[:-1])
    everything = Chosen(
        task.sampling,
        len(task.input_ids),
        tuple(result.output_ids),
        drawn=steps.drawn,
        logprobs=result.logprobs,
        prompt_logprobs=result.prompt_logprobs,
        inherited=steps.inherited,
    )
    verdicts: list[Verdict] = []
    # while every plan so far was verified, the stages a plan kept on the same node
    # resumed on caches that node built itself on right inputs (`Auditor.audit`)
    earlier: StagePlan | None = None
    clean = True
    rows = {
        e: {p for s, n in m.values() for p in range(s, s + n)} for e, (_, m) in by_epoch.items()
    }
    anywhere = set().union(*rows.values())
    last = max(by_epoch, default=0)
    for epoch in sorted(by_epoch):
        plan, mine = by_epoch[epoch]
        # the tokens this plan's steps chose, and those no step's rows hold (the last
        # plan's logits hold them: `Chosen`)
        judged = rows[epoch] | (set(range(len(sequence))) - anywhere if epoch == last else set())
        chosen = (
            replace(everything, positions=frozenset(judged)) if len(by_epoch) > 1 else everything
        )
        kept = {
            i: node
            for i, (node, layers) in enumerate(plan.stages)
            if clean
            and earlier is not None
            and i < len(earlier.stages)
            and earlier.stages[i] == (node, layers)
        }
        verdict = await _audit_plan(
            auditor,
            plan,
            mine,
            steps.every_row,
            records,
            request_id,
            sequence,
            chosen,
            weakest,
            members,
            kept,
        )
        verdict = replace(verdict, reason=_of_epoch(verdict.reason, epoch, by_epoch))
        if verdict.liars:
            await on_liars(verdict.liars, verdict.reason)
        # every plan is audited, also after one that could not be verified: a liar in a
        # later one is still found
        passed_over = verdict.unauditable and set(mine) <= steps.superseded
        if not passed_over:
            verdicts.append(verdict)
        else:
            log.info("audit of %s: passed over: %s", request_id, verdict.reason)
        earlier, clean = plan, clean and (verdict.verified or passed_over)
    verdict = _together(verdicts)
    outcome: Literal["verified", "unverified", "liar_found", "recomputed"] = (
        "liar_found"
        if verdict.liars
        else "verified"
        if verdict.verified
        else "recomputed"
        if verdict.recompute
        else "unverified"
    )
    emit(Verification(check="audit", outcome=outcome))
    return verdict


async def _audit_plan(
    auditor: Auditor,
    plan: StagePlan,
    positions: dict[int, tuple[int, int]],
    every_row: Collection[int],
    records: Sequence[Proof],
    request_id: RequestId,
    sequence: Sequence[int],
    chosen: Chosen,
    weakest: Shape | None,
    members: Collection[NodeId] | None,
    own_history: dict[int, NodeId],
) -> Verdict:
    """The audit of the steps that ran under one plan."""
    claims = auditor.claims_of(
        records, request_id=request_id, plan=plan, positions=positions, every_row=every_row
    )
    gap = auditor.gaps(claims, positions, len(plan.stages))
    if gap:
        return Verdict(False, reason=gap)
    try:
        return await auditor.audit(
            plan, request_id, sequence, claims, chosen, weakest, members, own_history
        )
    except ButterflyError as e:
        return Verdict(False, reason=f"audit could not run: {e}")


def _of_epoch(reason: str, epoch: int, plans: Collection[int]) -> str:
    """`reason`, naming its plan when the request ran under several."""
    return f"plan of epoch {epoch}: {reason}" if reason and len(plans) > 1 else reason


def _together(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict of the audits of a request's plans: verified if each was."""
    return Verdict(
        bool(verdicts) and all(v.verified for v in verdicts),
        tuple(dict.fromkeys(n for v in verdicts for n in v.liars)),
        "; ".join(v.reason for v in verdicts if v.reason),
        sum(v.checked for v in verdicts),
        tuple(e for v in verdicts for e in v.evidence),
        recompute=any(v.recompute for v in verdicts),
    )
