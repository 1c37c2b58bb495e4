"""Replicate verification: every step runs on f+1 disjoint lanes and is accepted on agreement.

Lane k is the k-th holder of every layer range (lane 0 is the plan's chain), so the f+1
lanes share no node and at least one of them is all honest: when every lane's output
agrees within tolerance (logits with `byzantine.rtol/atol`, the greedy token exactly),
that output is right (DESIGN.md section 3). Each lane keeps its own KV caches under a
lane-qualified request id on the wire, so stage servers need no change.

On disagreement the step widens: further holders, when the plan has them, replay the
history as extra lanes and a group of f+1 agreeing lanes wins; in any case the trusted
gateway re-executes the stages (`Referee`) from the token history, which decides the
output when no majority exists, and pinpoints each wrong lane's liar: the first node whose
signed record contradicts the re-execution (that record is the evidence). Lanes that differ
only in their greedy token, on a near-tie within the tolerance, are a dispute as well: the
re-execution's token is the answer whichever lane came first, and nobody is blamed, since
an honest output may name either (`lanes.could_deliver`). The generation goes on with a
lane that was right, so the step is not re-run; lanes that were wrong replay the history
on fresh caches at their next step, and a convicted node is left out of every lane until
the plan without it is in force.

A liar hides behind another in the same lane: once stage i's record contradicts the
re-execution, the later stages computed on a lie, and their records cannot be checked
(the gateway does not have the bytes they computed on). So, while fewer than f liars are
known, the dispute probes the rest of that lane: a lane made of a right lane's nodes up to
stage i and the wrong lane's nodes after it replays the history, and the first of its
records contradicting the re-execution convicts its signer, on the same evidence as any
lane (`lanes.probe_lane`). Without it, f colluders placed in one lane lose one member per
dispute, and the plan without that one may leave the others idle, never caught.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from butterfly.dataplane.lanes import (
    Lane,
    LaneRun,
    agree,
    could_deliver,
    first_contradiction,
    lanes_of,
    majority,
    probe_lane,
    records_by_stage,
)
from butterfly.dataplane.referee import Referee
from butterfly.metrics.events import Emit, Verification, discard
from butterfly.protocol.proof import Tolerance
from butterfly.types.errors import ButterflyError, InvalidInput, SendTimeout, StageLost
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof

log = logging.getLogger(__name__)


class LaneRunner(Protocol):
    """What the pipeline engine offers: one step down an explicit route, and release."""

    async def lane_step(
        self, wire_id: RequestId, step: int, start: int, x: torch.Tensor, route: Lane
    ) -> tuple[torch.Tensor, list[Proof]]: ...

    async def release_lane(self, wire_id: RequestId, nodes: Iterable[NodeId]) -> None: ...


class Timeouts(Protocol):
    """The gateway's count of unanswered steps (`dataplane.unresponsive.StepTimeouts`)."""

    def answered(self, nodes: Iterable[NodeId]) -> None: ...

    async def chain_timed_out(self, chain: Iterable[NodeId], what: str) -> None: ...

    async def timed_out(self, node: NodeId, what: str) -> bool: ...


# --- the gateway's driver ---------------------------------------------------------------


def _lane_id(request_id: RequestId, lane: int, generation: int) -> RequestId:
    """A lane's own id on the wire: its nodes keep its caches apart from other lanes'."""
    return RequestId(f"{request_id}~{lane}.{generation}")


@dataclass
class _LaneState:
    nodes: Lane
    wire_id: RequestId
    epoch: Epoch
    length: int  # positions its caches hold


@dataclass
class _Request:
    history: torch.Tensor | None = None
    lanes: dict[int, _LaneState] = field(default_factory=dict)
    used: dict[RequestId, set[NodeId]] = field(default_factory=dict)  # wire id -> its nodes
    generation: int = 0
    verified: bool = True
    liars_found: bool = False


class Replicator:
    def __init__(
        self,
        *,
        plan: Callable[[], StagePlan | None],
        f: int,
        keys: Mapping[NodeId, bytes],
        referee: Referee,
        tolerance: Tolerance,
        on_liars: Callable[[tuple[NodeId, ...], str], Awaitable[None]],
        timeouts: Timeouts | None = None,
        emit: Emit = discard,
        gateway: NodeId | None = None,
    ) -> None:
        """`timeouts`: a lane's unanswered step is counted against that lane's nodes,
        never against the chain's (the engine counts only plain chain steps).
        `gateway`: this node, whose own stage's errors are believed at once."""
        self._plan, self._f, self._keys, self._referee = plan, f, keys, referee
        self._timeouts, self._gateway = timeouts, gateway
        self._tol, self._on_liars, self._emit = tolerance, on_liars, emit
        self._requests: dict[str, _Request] = {}
        self.convicted: set[NodeId] = set()  # left out of every lane from conviction on

    def retune(self, tolerance: Tolerance) -> None:
        """Compare with changed byzantine.rtol/atol from the next comparison on."""
        self._tol = tolerance

    async def step(
        self, runner: LaneRunner, request_id: RequestId, step: int, pos: int, x: torch.Tensor
    ) -> torch.Tensor:
        """The step's output as f+1 disjoint lanes agree on it, or as the dispute decides."""
        req = self._requests.setdefault(request_id, _Request())
        if pos == 0 or req.history is None:
            req.history = x
        else:
            req.history = torch.cat([req.history[:, :pos], x], dim=1)
        history = req.history
        plan = self._plan()
        if plan is None:
            raise StageLost("the stage plan is gone")
        holders = plan.members
        if holders & self.convicted:
            raise StageLost(
                f"the plan of epoch {plan.epoch} still holds convicted nodes "
                f"{sorted(holders & self.convicted)}; waiting for the plan without them"
            )
        lanes = lanes_of(plan)
        if len(lanes) < self._f + 1:  # too few holders left: run, but do not claim a check
            log.warning(
                "replicate %s: the plan of epoch %d offers %d disjoint lanes, f+1=%d needed",
                request_id,
                plan.epoch,
                len(lanes),
                self._f + 1,
            )
            req.verified = False
        chosen = lanes[: self._f + 1]
        runs, claims = await self._run_lanes(runner, req, request_id, plan, chosen, step, pos, x)
        own = any(e.blame == self._gateway == lane[0] for lane, e in claims)
        if claims and (not runs or own):
            # every lane (f+1 disjoint ones: one is honest) or the gateway's own first
            # stage, fed its own input, says the step cannot be served: believed
            said = "; ".join(str(e) for _, e in claims)
            raise InvalidInput(f"the request cannot be served ({len(claims)} lanes agree): {said}")
        if not claims and all(agree(runs[0].out, r.out, self._tol) for r in runs[1:]):
            return runs[0].out  # one lane: unverified
        # a dispute: lanes disagree, or some claimed the step cannot be served while
        # others served it (an unsigned claim convicts nobody; the answer is decided as
        # in any dispute, and the claiming lane replays next step): widen, decide, blame
        for lane, e in claims:
            log.warning(
                "replicate %s step %d: lane %s's claim refuted: %s", request_id, step, lane, e
            )
        extra = lanes[self._f + 1 :]
        if extra:
            runs += await self._widen(runner, req, request_id, plan, extra, step, len(chosen))

        async def replay(nodes: Lane) -> LaneRun | None:
            return await self._replay(runner, req, request_id, plan, nodes, step, len(runs))

        out, liars, reason = await self._decide(plan, history, runs, replay)
        log.warning("replicate %s step %d: %s", request_id, step, reason)
        if out is None:
            req.verified = False
            return runs[0].out
        for state in req.lanes.values():
            run = next((r for r in runs if r.nodes == state.nodes), None)
            # wrong lanes replay on fresh caches next step; one within the tolerance of
            # the answer that only broke a near-tie the other way keeps its caches
            if run is not None and not could_deliver(run.out, out, self._tol):
                state.length = -1
        new = tuple(n for n in liars if n not in self.convicted)
        if liars:
            req.liars_found = True
            self.convicted.update(new)
        if new:
            await self._on_liars(new, f"replicate: {reason}")
        return out

    async def _run_lanes(
        self,
        runner: LaneRunner,
        req: _Request,
        request_id: RequestId,
        plan: StagePlan,
        lanes: Sequence[Lane],
        step: int,
        pos: int,
        x: torch.Tensor,
    ) -> tuple[list[LaneRun], list[tuple[Lane, ButterflyError]]]:
        """The lanes' answers, and the claims of those that answered with an error that
        is not retriable (another node's word that the step cannot be served). A
        retriable failure of any lane is raised: the step replays."""
        history = req.history
        assert history is not None
        sends: list[tuple[_LaneState, int, torch.Tensor]] = []
        for k, nodes in enumerate(lanes):
            state = req.lanes.get(k)
            if (
                state is None
                or (state.nodes, state.epoch) != (nodes, plan.epoch)
                or (pos and state.length != pos)
            ):
                # new or changed or poisoned caches: a fresh id, the whole history from 0
                req.generation += 1
                state = _LaneState(nodes, _lane_id(request_id, k, req.generation), plan.epoch, 0)
                req.lanes[k] = state
                sends.append((state, 0, history))
            else:
                sends.append((state, pos, x))
            req.used.setdefault(state.wire_id, set()).update(nodes)
        answers = await asyncio.gather(
            *(runner.lane_step(s.wire_id, step, start, inp, s.nodes) for s, start, inp in sends),
            return_exceptions=True,
        )
        runs: list[LaneRun] = []
        failed: BaseException | None = None
        claims: list[tuple[Lane, ButterflyError]] = []
        for (state, start, inp), answer in zip(sends, answers, strict=True):
            if isinstance(answer, BaseException):
                state.length = -1
                if (
                    isinstance(answer, ButterflyError)
                    and not answer.retriable
                    and answer.blame is not None
                ):
                    claims.append((state.nodes, answer))
                    continue
                if isinstance(answer, SendTimeout) and self._timeouts is not None:
                    what = f"step {step} of {state.wire_id}"
                    if answer.blame is not None:  # a lane's re-run one node at a time
                        await self._timeouts.timed_out(answer.blame, what)
                    else:
                        await self._timeouts.chain_timed_out(state.nodes, what)
                    answer = StageLost(f"lane {state.nodes}: {answer}")  # not the chain's
                failed = failed or answer
                continue
            if self._timeouts is not None:
                self._timeouts.answered(state.nodes)
            out, raw = answer
            state.length = start + inp.shape[1]
            records = records_by_stage(
                raw, lane=state.nodes, plan=plan, wire_id=state.wire_id, step=step, keys=self._keys
            )
            runs.append(LaneRun(state.nodes, start, inp.shape[1], out, records))
        if failed is not None:
            raise failed
        return runs, claims

    async def _widen(
        self,
        runner: LaneRunner,
        req: _Request,
        request_id: RequestId,
        plan: StagePlan,
        lanes: Sequence[Lane],
        step: int,
        first: int,
    ) -> list[LaneRun]:
        """Further holders replay the whole history as extra lanes (released at the end)."""
        runs = []
        for k, nodes in enumerate(lanes[: self._f], start=first):  # up to 2f+1 lanes in all
            run = await self._replay(runner, req, request_id, plan, nodes, step, k)
            if run is not None:
                runs.append(run)
        return runs

    async def _replay(
        self,
        runner: LaneRunner,
        req: _Request,
        request_id: RequestId,
        plan: StagePlan,
        nodes: Lane,
        step: int,
        k: int,
    ) -> LaneRun | None:
        """`nodes` replay the whole history under a fresh wire id (released at the end);
        None if they could not (a lane that fails proves nothing against anyone)."""
        history = req.history
        assert history is not None
        req.generation += 1
        wire_id = _lane_id(request_id, k, req.generation)
        req.used.setdefault(wire_id, set()).update(nodes)
        try:
            out, raw = await runner.lane_step(wire_id, step, 0, history, nodes)
        except ButterflyError as e:
            log.warning("replicate %s: extra lane %s failed: %s", request_id, nodes, e)
            return None
        records = records_by_stage(
            raw, lane=nodes, plan=plan, wire_id=wire_id, step=step, keys=self._keys
        )
        return LaneRun(nodes, 0, history.shape[1], out, records)

    async def _decide(
        self,
        plan: StagePlan,
        history: torch.Tensor,
        runs: Sequence[LaneRun],
        replay: Callable[[Lane], Awaitable[LaneRun | None]],
    ) -> tuple[torch.Tensor | None, tuple[NodeId, ...], str]:
        """(the right output or None, the liars, why): a majority of f+1 agreeing lanes
        decides the output; the gateway's re-execution decides it otherwise, and always
        names the liars, since only a contradiction of it is evidence. `replay` runs a
        probe lane (`_behind`)."""
        outs = [r.out for r in runs]
        winner = majority(outs, self._f, self._tol) if len(runs) > self._f + 1 else None
        try:
            reference = await self._reference(plan, history)
        except Exception as e:  # the referee failing must not take the request down
            log.error("replicate: the referee could not re-execute: %s", e)
            if winner is None:
                return None, (), f"lanes disagree and the referee failed: {e}"
            return outs[winner], (), f"majority of {len(runs)} lanes; referee failed: {e}"
        liars: list[NodeId] = []
        reasons: list[str] = []
        verdicts = [first_contradiction(run, reference, self._tol) for run in runs]
        # a lane whose every record matches the re-execution: its nodes lead the probes
        right_lane = next(
            (r.nodes for r, v in zip(runs, verdicts, strict=True) if v == (False, None, "")),
            None,
        )
        for run, (wrong, liar, why) in zip(runs, verdicts, strict=True):
            if liar is not None:
                liars.append(liar)
            if wrong:
                reasons.append(why)
            if liar is not None and right_lane is not None:
                more, whys = await self._behind(
                    run.nodes, liar, right_lane, reference, liars, replay
                )
                liars += more
                reasons += whys
        final = reference[-1][:, -1:]
        right = [
            i
            for i, r in enumerate(runs)
            if r.out.shape == final.shape and agree(r.out, final, self._tol)
        ]
        if winner is not None and winner not in right:
            log.error("replicate: the majority of lanes contradicts the gateway's re-execution")
        out = outs[right[0]] if right else final
        how = "majority" if winner is not None else "re-execution"
        return (
            out,
            tuple(dict.fromkeys(liars)),
            f"lanes disagree; {how} decides; "
            + ("; ".join(reasons) or "no lane contradicts the re-execution"),
        )

    async def _behind(
        self,
        suspect: Lane,
        liar: NodeId,
        right: Lane,
        reference: Sequence[torch.Tensor],
        known: Sequence[NodeId],
        replay: Callable[[Lane], Awaitable[LaneRun | None]],
    ) -> tuple[list[NodeId], list[str]]:
        """Liars among the nodes after `liar` in the `suspect` lane, found by probe lanes
        (`probe_lane`), one per liar found, while fewer than f liars are known (with at
        most f, the rest are then honest). A probe's contradiction is evidence as any
        lane's: the signer's record, on the input its predecessor signed, against the
        gateway's re-execution; a probe that fails or contradicts nothing ends the search.

        What a probe cannot catch: a node that lies only when its input is already a lie
        (its record in the suspect lane is unchecked: the gateway never saw the bytes it
        computed on). Such a lie changes no answer, the lane being wrong already, and
        the first liar of a lane always lies on a right input and is convicted: a liar
        hiding this way is convicted when it lies with no partner in front of it."""
        found: list[NodeId] = []
        whys: list[str] = []
        at = suspect.index(liar)
        while at < len(suspect) - 1 and len(self.convicted | {*known, *found}) < self._f:
            nodes = probe_lane(suspect, at, right)
            run = await replay(nodes)
            if run is None:
                break
            _, caught, why = first_contradiction(run, reference, self._tol)
            if caught is None or caught in known or caught in found:
                break
            found.append(caught)
            whys.append(f"probe lane {nodes}: {why}")
            if caught not in suspect[at + 1 :]:
                break  # a node of the right lane lied in the probe: convicted, search over
            at = suspect.index(caught)
        return found, whys

    async def _reference(self, plan: StagePlan, history: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output over the whole history, computed by the gateway itself."""
        outputs, x = [], history
        for _, layers in plan.stages:
            x = await self._referee.run(LayerRange(layers.start, layers.end), x)
            outputs.append(x)
        return outputs

    def finish(self, request_id: RequestId) -> Literal["replicate", "none"]:
        """Which check the request's result passed; one metric event per request."""
        req = self._requests.get(request_id, _Request(verified=False))
        outcome: Literal["verified", "unverified", "liar_found"] = (
            "unverified" if not req.verified else "liar_found" if req.liars_found else "verified"
        )
        self._emit(Verification(check="replicate", outcome=outcome))
        return "replicate" if req.verified else "none"

    async def release(self, runner: LaneRunner, request_id: RequestId) -> None:
        """Free every lane's caches the request used, on every node that held them."""
        req = self._requests.pop(request_id, None)
        plan = self._plan()
        # every holder: chain nodes may have copied their caches to their standbys
        holders = plan.members if plan else frozenset()
        for wire_id, nodes in (req.used if req else {}).items():
            await runner.release_lane(wire_id, sorted(nodes | holders))
