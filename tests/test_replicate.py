"""Replicate verification without sockets: the pure decisions, and the gateway's driver
over real stage servers (honest and lying) called in-process, lane by lane."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import pytest
import torch

from butterfly.config import load_config
from butterfly.config.validate import replication_factor
from butterfly.dataplane.lanes import (
    Lane,
    LaneRun,
    agree,
    first_contradiction,
    lanes_of,
    majority,
    probe_lane,
)
from butterfly.dataplane.proving import Prover, decode_proofs
from butterfly.dataplane.referee import Referee
from butterfly.dataplane.replicate import Replicator
from butterfly.dataplane.stage_server import StageServer
from butterfly.protocol.proof import Tolerance
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.testing.liars import CorruptStageServer, WrongLayerStageServer
from butterfly.types.errors import SendTimeout, StageLost
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange as R
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof
from butterfly.types.wire.data import StageStep

TOL = Tolerance(rtol=1e-3, atol=1e-4)


def plan_of(epoch: int, stages: list[tuple[int, R]], replicas: list[tuple[int, R]]) -> StagePlan:
    return StagePlan(
        epoch,
        tuple((NodeId(n), r) for n, r in stages),
        tuple((NodeId(n), r) for n, r in replicas),
    )


def test_config_accepts_replicate_with_f_plus_one_holders() -> None:
    members = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]
    cfg = load_config(
        overrides={
            "cluster.members": members,
            "byzantine.f": 1,
            "byzantine.verification": "replicate",
        }
    )
    assert cfg.byzantine.verification == "replicate"
    assert replication_factor(cfg) == 2


# --- pure decisions -----------------------------------------------------------------------


def test_lanes_are_disjoint_and_lane_zero_is_the_chain() -> None:
    plan = plan_of(1, [(0, R(0, 2)), (1, R(2, 4))], [(2, R(0, 2)), (3, R(2, 4)), (4, R(0, 2))])
    assert lanes_of(plan) == [(0, 1), (2, 3)]  # node 4 has no partner for layers 2-4
    assert lanes_of(plan, exclude=[3]) == [(0, 1)]
    single = plan_of(2, [(0, R(0, 4))], [(2, R(0, 4))])
    assert lanes_of(single) == [(0,), (2,)]


def test_agreement_needs_close_logits_and_the_same_token() -> None:
    a = torch.tensor([[[0.1, 2.0, 1.0]]])
    assert agree(a, a + 1e-6, TOL)
    assert not agree(a, a + torch.tensor([[[0.0, 0.5, 0.0]]]), TOL)
    # within a loose tolerance but the greedy token differs: still a disagreement
    assert not agree(a, torch.tensor([[[0.1, 2.0, 2.01]]]), Tolerance(rtol=0.1, atol=0.1))
    assert not agree(a, a[..., :2], TOL)


def test_majority_needs_f_plus_one_agreeing_lanes() -> None:
    good = torch.tensor([[[0.0, 1.0]]])
    bad = torch.tensor([[[1.0, 0.0]]])
    assert majority([bad, good, good], 1, TOL) == 1
    assert majority([good, bad], 1, TOL) is None  # f+1 lanes that disagree decide nothing
    assert majority([good, bad, bad * 2], 1, TOL) is None
    assert majority([good, bad, good, good, bad], 2, TOL) == 0


def _signed(key: SigningKey, node: int, stage: int, x: torch.Tensor, out: torch.Tensor) -> Proof:
    raw = Prover(NodeId(node), key).prove(
        epoch=1,
        request_id="r~0.1",
        step=1,
        stage=stage,
        layers=R(0, 1),
        x_in=x,
        out=out,
        layer_outputs=(out,),
    )
    return next(decode_proofs([raw]))


def test_first_contradiction_blames_the_signer_of_the_first_wrong_record() -> None:
    key = SigningKey.generate()
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 2, 3]])
    mid, logits = torch.randn(1, 3, 8), torch.randn(1, 3, 16)
    reference = [mid, logits]
    honest = {
        0: _signed(key, 0, 0, tokens, mid),
        1: _signed(key, 1, 1, mid, logits[:, -1:]),
    }
    lane = (NodeId(0), NodeId(1))
    right = LaneRun(lane, 0, 3, logits[:, -1:], honest)
    assert first_contradiction(right, reference, TOL) == (False, None, "")

    bent = mid + 0.5
    lied = {0: _signed(key, 0, 0, tokens, bent), 1: _signed(key, 1, 1, bent, logits[:, -1:] + 1)}
    wrong, liar, _ = first_contradiction(
        LaneRun(lane, 0, 3, logits[:, -1:] + 1, lied), reference, TOL
    )
    assert (wrong, liar) == (True, 0)  # the second node computed honestly on a lie

    # node 0 signed the right output but passed on other bytes: nobody can be blamed
    passed_on = {0: honest[0], 1: _signed(key, 1, 1, bent, logits[:, -1:] + 1)}
    wrong, liar, why = first_contradiction(
        LaneRun(lane, 0, 3, logits[:, -1:] + 1, passed_on), reference, TOL
    )
    assert (wrong, liar) == (True, None), why

    # every record right, the delivered logits not: the last node answered the gateway
    wrong, liar, _ = first_contradiction(
        LaneRun(lane, 0, 3, logits[:, -1:] * 2, honest), reference, TOL
    )
    assert (wrong, liar) == (True, 1)

    # every record right, the delivered logits within the tolerance but the two best
    # swapped (a near-tie honest kernels break differently): nobody lied
    tied = logits.clamp(max=1.5)
    tied[0, -1, :2] = torch.tensor([2.0, 1.999])
    flipped = tied[:, -1:].clone()
    flipped[0, 0, :2] = torch.tensor([1.999, 2.0])
    records = {0: honest[0], 1: _signed(key, 1, 1, mid, flipped)}
    assert first_contradiction(LaneRun(lane, 0, 3, flipped, records), [mid, tied], TOL) == (
        False,
        None,
        "",
    )
    # a token raised clearly above the best, past the tolerance: the last node lied
    raised = tied[:, -1:].clone()
    raised[0, 0, 2] = 2.1
    wrong, liar, _ = first_contradiction(LaneRun(lane, 0, 3, raised, records), [mid, tied], TOL)
    assert (wrong, liar) == (True, 1)


def test_a_probe_lane_keeps_a_right_prefix_and_the_suspects_after_the_liar() -> None:
    suspect, right = (NodeId(6), NodeId(7), NodeId(8)), (NodeId(0), NodeId(1), NodeId(2))
    assert probe_lane(suspect, 0, right) == (0, 7, 8)
    assert probe_lane(suspect, 1, right) == (0, 1, 8)
    assert probe_lane(suspect, 2, right) == (0, 1, 2)  # nothing left behind the liar


# --- the driver over in-process stage servers ----------------------------------------------


class InProcess:
    """Lanes over real stage servers, called directly (what the engine does over TCP)."""

    def __init__(self, servers: dict[NodeId, StageServer], epoch: int) -> None:
        self.servers, self.epoch = servers, epoch
        self.sent: list[tuple[str, int, int, Lane]] = []  # wire id, step, start, route
        self.released: set[str] = set()

    async def lane_step(
        self, wire_id: str, step: int, start: int, x: torch.Tensor, route: Lane
    ) -> tuple[torch.Tensor, list[Proof]]:
        self.sent.append((wire_id, step, start, route))
        payload, proofs = encode_tensor(x), ()
        for node in route:
            msg = StageStep((wire_id,), (step,), (start,), (x.shape[1],), (), 0, True, proofs)
            payload, signed = await self.servers[node].compute(msg, self.epoch, payload)
            proofs = proofs + signed
        return decode_tensor(payload, 1 << 30), list(decode_proofs(proofs))

    async def release_lane(self, wire_id: str, nodes: Iterable[NodeId]) -> None:
        self.released.add(wire_id)
        for node in nodes:
            self.servers[node].release(wire_id)


def _layers(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["num_hidden_layers"])


async def _cluster(
    model: Path, liars: dict[int, type[StageServer]], plan: StagePlan
) -> tuple[dict[NodeId, StageServer], dict[NodeId, bytes]]:
    servers = {}
    nodes = sorted({n for n, _ in (*plan.stages, *plan.replicas)})
    signing = {node: SigningKey.generate() for node in nodes}
    keys = {node: key.public for node, key in signing.items()}
    for node in nodes:
        cls = liars.get(int(node), StageServer)
        servers[node] = cls(
            node=node,
            model_dir=model,
            max_tensor_bytes=1 << 30,
            torch_thread=TorchThread(),
            prover=Prover(node, signing[node], keys=keys),
        )
        ack = await servers[node].apply_plan(plan.to_message("hash"))
        assert ack.ok, ack.reason
    return servers, keys


async def _generate(
    replicator: Replicator, runner: InProcess, prompt: list[int], new: int
) -> list[int]:
    """Greedy generation as the engine's `_generate` drives it, step by step."""
    x = torch.tensor([prompt])
    out: list[int] = []
    pos = 0
    for step in range(1, new + 1):
        logits = await replicator.step(runner, "r", step, pos, x)
        token = int(logits[0, -1].argmax())
        out.append(token)
        pos += x.shape[1]
        x = torch.tensor([[token]])
    return out


@pytest.mark.parametrize(
    ("liar", "kind"),
    [(None, None), (1, CorruptStageServer), (2, CorruptStageServer), (3, WrongLayerStageServer)],
    ids=["honest", "chain-last-corrupt", "lane1-first-corrupt", "lane1-last-wrong-layer"],
)
def test_replicated_steps_return_the_reference_and_convict_the_liar(
    tiny_model: Path, liar: int | None, kind: type[StageServer] | None
) -> None:
    half = _layers(tiny_model) // 2
    lo, hi = R(0, half), R(half, _layers(tiny_model))
    plan = plan_of(1, [(0, lo), (1, hi)], [(2, lo), (3, hi)])
    prompt, new = [5, 17, 33, 2], 6
    expected = list(generate([load_stage(tiny_model)], prompt, new))
    convictions: list[tuple[NodeId, ...]] = []

    async def on_liars(nodes: tuple[NodeId, ...], reason: str) -> None:
        convictions.append(nodes)

    async def main() -> None:
        servers, keys = await _cluster(tiny_model, {liar: kind} if liar and kind else {}, plan)
        current = [plan]
        replicator = Replicator(
            plan=lambda: current[0],
            f=1,
            keys=keys,
            referee=Referee(tiny_model, TorchThread()),
            tolerance=TOL,
            on_liars=on_liars,
        )
        runner = InProcess(servers, 1)
        tokens = await _generate(replicator, runner, prompt, 1)
        assert replicator.finish("r") == "replicate"
        if liar is None:
            tokens += await _generate_rest(replicator, runner, prompt + tokens, new - 1)
            assert tokens == expected
            assert convictions == []
            assert {w for w, *_ in runner.sent} == {"r~0.1", "r~1.2"}  # one cache per lane
        else:
            assert tokens == expected[:1]  # the disputed step's output is the right one
            assert convictions == [(NodeId(liar),)]
            # the plan still holds the liar: the next step waits for the plan without it
            with pytest.raises(StageLost):
                await replicator.step(runner, "r", 2, len(prompt), torch.tensor([tokens]))
            alive = [n for n in (0, 1, 2, 3) if n != liar]
            new_plan = plan_of(
                2, [(alive[0], R(0, _layers(tiny_model)))], [(alive[1], R(0, _layers(tiny_model)))]
            )
            for node in alive:
                assert (await servers[NodeId(node)].apply_plan(new_plan.to_message("hash"))).ok
            current[0], runner.epoch = new_plan, 2
            sent_before = len(runner.sent)
            tokens += await _generate_rest(replicator, runner, prompt + tokens, new - 1)
            assert tokens == expected
            # the new lanes start on fresh caches with the whole history, once
            assert [s[2] for s in runner.sent[sent_before : sent_before + 2]] == [0, 0]
            assert convictions == [(NodeId(liar),)]
        await replicator.release(runner, "r")
        assert {w for w, *_ in runner.sent} <= runner.released
        assert all(not s.caches for s in servers.values())

    asyncio.run(main())


async def _generate_rest(
    replicator: Replicator, runner: InProcess, history: list[int], new: int
) -> list[int]:
    """Continue after `history`: the first step sends only the last token, at its position."""
    out: list[int] = []
    pos, x = len(history) - 1, torch.tensor([history[-1:]])
    for i in range(new):
        logits = await replicator.step(runner, "r", 100 + i, pos, x)
        token = int(logits[0, -1].argmax())
        out.append(token)
        pos += 1
        x = torch.tensor([[token]])
    return out


class _Silent(InProcess):
    """Lanes through `silent` never answer (the engine's step timeout fires)."""

    def __init__(self, servers: dict[NodeId, StageServer], epoch: int, silent: int) -> None:
        super().__init__(servers, epoch)
        self.silent = NodeId(silent)

    async def lane_step(
        self, wire_id: str, step: int, start: int, x: torch.Tensor, route: Lane
    ) -> tuple[torch.Tensor, list[Proof]]:
        if self.silent in route:
            raise SendTimeout(f"step {step} of {wire_id} got no answer", blame=self.blame)
        return await super().lane_step(wire_id, step, start, x, route)

    blame: NodeId | None = None  # the sender's finding, re-running the lane node by node


class _Timeouts:
    """Records what the replicator reports (the rule itself is `StepTimeouts`')."""

    def __init__(self) -> None:
        self.answered_by: list[tuple[NodeId, ...]] = []
        self.lost: list[tuple[NodeId, ...]] = []

    def answered(self, nodes: Iterable[NodeId]) -> None:
        self.answered_by.append(tuple(nodes))

    async def chain_timed_out(self, chain: Iterable[NodeId], what: str) -> None:
        self.lost.append(tuple(chain))

    async def timed_out(self, node: NodeId, what: str) -> bool:
        self.lost.append((node,))
        return True


@pytest.mark.parametrize(("silent", "blame"), [(1, None), (3, None), (3, 3)])
def test_a_lane_timeout_counts_against_that_lane_never_the_chain(
    tiny_model: Path, silent: int, blame: int | None
) -> None:
    """The lane that did not answer is reported as the route that timed out, the lane that
    answered as answered; the step fails as a lost stage (replayed by the engine), not as
    a timeout the engine would count against the plan's chain. Where the sender, re-running
    a lane one node at a time, named the node that held the step back
    (`SendTimeout.blame`), that node is what counts: counted against the lane as a whole,
    a withholder in the second lane was never charged, and every request failed (a
    review)."""
    half = _layers(tiny_model) // 2
    lo, hi = R(0, half), R(half, _layers(tiny_model))
    plan = plan_of(1, [(0, lo), (1, hi)], [(2, lo), (3, hi)])

    async def nobody(nodes: tuple[NodeId, ...], reason: str) -> None:
        raise AssertionError(f"{nodes} convicted: {reason}")

    async def main() -> None:
        servers, keys = await _cluster(tiny_model, {}, plan)
        timeouts = _Timeouts()
        replicator = Replicator(
            plan=lambda: plan,
            f=1,
            keys=keys,
            referee=Referee(tiny_model, TorchThread()),
            tolerance=TOL,
            on_liars=nobody,
            timeouts=timeouts,
        )
        runner = _Silent(servers, 1, silent)
        runner.blame = None if blame is None else NodeId(blame)
        with pytest.raises(StageLost):
            await replicator.step(runner, "r", 1, 0, torch.tensor([[5, 6]]))
        lanes = {1: ((0, 1), (2, 3)), 3: ((2, 3), (0, 1))}[silent]
        assert timeouts.lost == [lanes[0] if blame is None else (NodeId(blame),)]
        assert timeouts.answered_by == [lanes[1]]

    asyncio.run(main())


def test_a_dispute_widens_to_further_holders_and_the_majority_wins(tiny_model: Path) -> None:
    """With three holders per range (replication 2f+1), a dispute between lanes 0 and 1
    replays the history on lane 2, whose agreement with lane 0 decides the step."""
    half = _layers(tiny_model) // 2
    lo, hi = R(0, half), R(half, _layers(tiny_model))
    plan = plan_of(1, [(0, lo), (1, hi)], [(2, lo), (3, hi), (4, lo), (5, hi)])
    prompt = [5, 17, 33, 2]
    expected = list(generate([load_stage(tiny_model)], prompt, 1))
    convicted: list[tuple[NodeId, ...]] = []

    async def on_liars(nodes: tuple[NodeId, ...], reason: str) -> None:
        convicted.append(nodes)

    async def main() -> None:
        servers, keys = await _cluster(tiny_model, {3: CorruptStageServer}, plan)
        replicator = Replicator(
            plan=lambda: plan,
            f=1,
            keys=keys,
            referee=Referee(tiny_model, TorchThread()),
            tolerance=TOL,
            on_liars=on_liars,
        )
        runner = InProcess(servers, 1)
        assert await _generate(replicator, runner, prompt, 1) == expected
        assert [route for *_, route in runner.sent] == [(0, 1), (2, 3), (4, 5)]
        assert convicted == [(NodeId(3),)]
        await replicator.release(runner, "r")
        assert all(not s.caches for s in servers.values())

    asyncio.run(main())


def test_colluders_in_one_lane_are_both_convicted_in_one_dispute(tiny_model: Path) -> None:
    """f = 2 liars that are the two stages of one lane: the first's record contradicts the
    re-execution, the second computed on the first's lie, so its own record cannot be
    checked. A probe lane (a right lane's first stage, then the second liar) replays the
    history and convicts it in the same dispute; before, it stayed, and the plan without
    its partner left it idle, never caught (bench/trust.py seeds 3595, 4269, 7762, 9191)."""
    half = _layers(tiny_model) // 2
    lo, hi = R(0, half), R(half, _layers(tiny_model))
    plan = plan_of(1, [(0, lo), (1, hi)], [(2, lo), (3, hi), (4, lo), (5, hi)])
    prompt = [5, 17, 33, 2]
    expected = list(generate([load_stage(tiny_model)], prompt, 1))
    convicted: list[tuple[NodeId, ...]] = []

    async def on_liars(nodes: tuple[NodeId, ...], reason: str) -> None:
        convicted.append(nodes)

    async def main() -> None:
        servers, keys = await _cluster(
            tiny_model, {4: CorruptStageServer, 5: CorruptStageServer}, plan
        )
        replicator = Replicator(
            plan=lambda: plan,
            f=2,
            keys=keys,
            referee=Referee(tiny_model, TorchThread()),
            tolerance=TOL,
            on_liars=on_liars,
        )
        runner = InProcess(servers, 1)
        assert await _generate(replicator, runner, prompt, 1) == expected
        routes = [route for *_, route in runner.sent]
        assert routes[:3] == [(0, 1), (2, 3), (4, 5)]
        assert routes[3:] == [(0, 5)]  # the probe: a right lane's first stage, then node 5
        assert convicted == [(NodeId(4), NodeId(5))]
        assert replicator.convicted == {NodeId(4), NodeId(5)}
        await replicator.release(runner, "r")
        assert {w for w, *_ in runner.sent} <= runner.released
        assert all(not s.caches for s in servers.values())

    asyncio.run(main())


def test_no_probe_once_f_liars_are_known(tiny_model: Path) -> None:
    """With f = 1 the one liar convicted is all there can be: no probe lane runs, and the
    honest node behind it in its lane is never put to the test, let alone convicted."""
    half = _layers(tiny_model) // 2
    lo, hi = R(0, half), R(half, _layers(tiny_model))
    plan = plan_of(1, [(0, lo), (1, hi)], [(2, lo), (3, hi)])
    convicted: list[tuple[NodeId, ...]] = []

    async def on_liars(nodes: tuple[NodeId, ...], reason: str) -> None:
        convicted.append(nodes)

    async def main() -> None:
        servers, keys = await _cluster(tiny_model, {2: CorruptStageServer}, plan)
        replicator = Replicator(
            plan=lambda: plan,
            f=1,
            keys=keys,
            referee=Referee(tiny_model, TorchThread()),
            tolerance=TOL,
            on_liars=on_liars,
        )
        runner = InProcess(servers, 1)
        await _generate(replicator, runner, [5, 17, 33, 2], 1)
        assert [route for *_, route in runner.sent] == [(0, 1), (2, 3)]
        assert convicted == [(NodeId(2),)]
        await replicator.release(runner, "r")

    asyncio.run(main())


class _FixedLogits:
    """One-stage lanes whose nodes deliver given logits, each signing what it delivers
    unless told otherwise, and a referee re-executing to given logits: two honest
    computations of one step, as a near-tie between kernels leaves them, with no model."""

    def __init__(
        self,
        delivered: dict[NodeId, torch.Tensor],
        signed: dict[NodeId, torch.Tensor],
        reference: torch.Tensor,
    ) -> None:
        self.delivered, self.signed, self.reference = delivered, signed, reference
        self.keys = {node: SigningKey.generate() for node in delivered}
        self.kept: list[int] = []  # each lane's cached positions after the step

    async def lane_step(
        self, wire_id: str, step: int, start: int, x: torch.Tensor, route: Lane
    ) -> tuple[torch.Tensor, list[Proof]]:
        (node,) = route
        out = self.delivered[node]
        raw = Prover(node, self.keys[node]).prove(
            epoch=1,
            request_id=wire_id,
            step=step,
            stage=0,
            layers=R(0, 1),
            x_in=x,
            out=self.signed.get(node, out),
            layer_outputs=(self.signed.get(node, out),),
        )
        return out, list(decode_proofs([raw]))

    async def release_lane(self, wire_id: str, nodes: Iterable[NodeId]) -> None:
        pass

    async def run(self, layers: R, x: torch.Tensor) -> torch.Tensor:
        """The referee's re-execution of the history: only its last row matters here."""
        rows = torch.zeros(1, x.shape[1], self.reference.shape[-1])
        rows[0, -1] = self.reference
        return rows


def _one_step(lanes: _FixedLogits) -> tuple[int, list[tuple[NodeId, ...]], str]:
    """(the token answered, the convictions, the check passed) of one replicated step
    over `lanes`' nodes, the first of them the chain."""
    chain, other = lanes.delivered
    convicted: list[tuple[NodeId, ...]] = []

    async def on_liars(nodes: tuple[NodeId, ...], reason: str) -> None:
        convicted.append(nodes)

    async def main() -> tuple[int, list[tuple[NodeId, ...]], str]:
        replicator = Replicator(
            plan=lambda: plan_of(1, [(chain, R(0, 1))], [(other, R(0, 1))]),
            f=1,
            keys={node: key.public for node, key in lanes.keys.items()},
            referee=cast(Referee, lanes),
            tolerance=TOL,
            on_liars=on_liars,
        )
        out = await replicator.step(lanes, "r", 1, 0, torch.tensor([[5, 6, 7]]))
        kept.extend(s.length for s in replicator._requests["r"].lanes.values())
        return int(out[0, -1].argmax()), convicted, replicator.finish("r")

    kept: list[int] = []
    answer = asyncio.run(main())
    lanes.kept = kept
    return answer


@pytest.mark.parametrize("reference_token", [0, 1])
@pytest.mark.parametrize("chain_token", [0, 1])
def test_a_near_tie_between_lanes_convicts_nobody_and_the_reexecution_picks_the_token(
    reference_token: int, chain_token: int
) -> None:
    """Two honest lanes whose logits agree within the tolerance but whose greedy tokens
    differ (the two best 0.001 apart, as bfloat16 kernels chosen by each node's own
    timing leave them at ~1% of positions): the step is disputed, nobody is convicted,
    and the answer names the re-execution's token whichever lane is the chain. Before,
    the lane whose token was not the re-execution's was blamed on its last node
    ("delivered another output than it signed") and evicted (a review)."""

    def logits(best: int) -> torch.Tensor:
        row = torch.tensor([1.999, 1.999, 0.0, -1.0])
        row[best] = 2.0
        return row

    delivered = {
        NodeId(0): logits(chain_token).view(1, 1, -1),
        NodeId(2): logits(1 - chain_token).view(1, 1, -1),
    }
    lanes = _FixedLogits(delivered, {}, logits(reference_token))
    assert _one_step(lanes) == (reference_token, [], "replicate")
    # both lanes computed honestly: neither replays its history on fresh caches
    assert lanes.kept and all(length > 0 for length in lanes.kept), lanes.kept


@pytest.mark.parametrize("signs", ["the honest logits", "its lie"])
@pytest.mark.parametrize("liar", [0, 2])
def test_a_last_stage_delivering_a_token_clearly_above_the_best_is_convicted(
    liar: int, signs: str
) -> None:
    """The near-tie allowance is the tolerance's: a last stage that delivers logits
    raising a token clearly above the best, past the tolerance, is still convicted,
    whether it signs the honest logits (its delivery contradicts its record) or exactly
    what it sends, as a real liar would (its record contradicts the re-execution), and
    the answer is the re-execution's token."""
    honest = torch.tensor([2.0, 1.999, 0.0, -1.0])
    lying = honest.clone()
    lying[2] = 2.1
    delivered = {n: (lying if n == liar else honest).view(1, 1, -1) for n in map(NodeId, (0, 2))}
    signed = {NodeId(liar): honest.view(1, 1, -1)} if signs == "the honest logits" else {}
    lanes = _FixedLogits(delivered, signed, honest)
    assert _one_step(lanes) == (0, [(NodeId(liar),)], "replicate")
