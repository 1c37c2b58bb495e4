"""A holder of the previous layer range that is on no route cannot drive an honest node:
stages run only steps the acting gateway signed (protocol.dispatch), from the node before
them on the signed route, each newer than the last they ran.

Before, one liar at f = 1 (a standby of stage 0, sent KV copies, so it knew the request
ids and positions) got honest node 1 evicted by cutting its cache back and refilling it
with its own bytes (the audit blamed node 1), and failed a client's request by spraying
misshapen steps whose refusals the honest nodes sent to the gateway as claims."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from butterfly.dataplane.stage_server import StageServer
from butterfly.protocol.dispatch import Dispatcher, Refusal, Serials, dispatched
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.agreement import Dispatch, decode
from butterfly.types.wire.data import KvAppend, StageStep

pytestmark = pytest.mark.timeout(120)
LIAR = NodeId(2)


class Forger(StageServer):
    """A standby of the first range (on no route): once the gateway's KV copies name a
    request, it sends the stage-1 holders steps of its own for it, signing a record of
    what it sends and a dispatch of them as an honest node would sign its own: one that
    cuts node 1's cache back to 0 and refills it, and misshapen ones naming the next 50
    steps with the gateway to answer."""

    deliver = None  # the liar's own router's `deliver`, set by the test
    sent = 0

    def on_kv_append(self, msg: KvAppend, payload: bytes) -> str:
        refused = super().on_kv_append(msg, payload)
        if self.deliver is not None and self.sent == 0:
            length = msg.start + decode_tensor(payload).shape[-2]
            asyncio.get_running_loop().create_task(self.forge(msg.request_id, length))
        return refused

    async def forge(self, rid: RequestId, length: int) -> None:
        assert self.deliver is not None and self.prover is not None
        x = torch.randn(1, length + 4, 64) * 3
        record = self.prover.prove(
            epoch=self.epoch,
            request_id=rid,
            step=10**6,
            stage=StageIndex(0),
            layers=LayerRange(0, 2),
            x_in=torch.zeros(1, length + 4, dtype=torch.int64),
            out=x,
            layer_outputs=(x, x),
        )
        poison = StageStep((rid,), (10**6,), (0,), (length + 4,), (), LIAR, True, (record,))
        steps = tuple(range(1, 51))
        n = len(steps)
        claims = StageStep((rid,) * n, steps, (0,) * n, (1,) * n, (), NodeId(0), True)
        # as a real liar would, it dispatches them itself, signing with its own key
        own = Dispatcher(LIAR, self.prover.key)
        poison = own.stamp(poison, NodeId(1), self.epoch)
        claims = own.stamp(claims, NodeId(1), self.epoch)
        for victim in (NodeId(1), NodeId(3)):
            await self.deliver(victim, poison, encode_tensor(x))
            await self.deliver(victim, claims, encode_tensor(torch.zeros(1, n)))
            self.sent += 2


async def test_a_standby_on_no_route_gets_no_honest_node_blamed_and_no_request_failed(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = {"coordination.heartbeat_interval_ms": 10}
    async with InProcessCluster(
        tiny_model, 4, tmp_path, f=1, settings=settings, stage_servers={LIAR: Forger}
    ) as c:
        gw = c.gateway
        liar = c.nodes[LIAR].stage_server
        assert isinstance(liar, Forger)
        liar.deliver = c.nodes[LIAR].router.deliver
        plan = await c.first_plan()
        assert (
            plan is not None and LIAR not in plan.nodes and LIAR in plan.holders(plan.stages[0][1])
        )
        ids = tuple(TextCodec.load(tiny_model).encode("Once upon a time"))
        result = await c.infer(InferenceTask(RequestId("r1"), ids, max_new_tokens=24), beats=3000)
        assert liar.sent >= 2  # the forged steps went out, while the request ran
        expected = generate([load_stage(tiny_model)], list(ids), 24, stop_ids=())
        assert list(result.output_ids) == list(expected) and result.verified == "audit"
        for _ in range(50):  # any eviction the forged steps led to would be agreed by now
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        assert all(not node.plans.evicted for node in c.nodes)
        assert gw.stage_server.plan is not None and gw.stage_server.plan.epoch == plan.epoch


# --- the check itself, in one process ----------------------------------------------------

GATEWAY = NodeId(0)
KEYS = {NodeId(i): SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(4)}
PUBLIC = {n: k.public for n, k in KEYS.items()}


def step_to(first: NodeId, route: tuple[NodeId, ...], signer: NodeId = GATEWAY) -> StageStep:
    msg = StageStep(("r",), (4,), (9,), (1,), route, NodeId(0), True)
    return Dispatcher(signer, KEYS[signer]).stamp(msg, first, epoch=3)


def check(msg: StageStep, peer: int, me: int, gateway: int = 0) -> Dispatch | Refusal:
    return dispatched(
        msg,
        peer=NodeId(peer),
        me=NodeId(me),
        gateway=NodeId(gateway),
        gateways=(GATEWAY, NodeId(1)),
        keys=PUBLIC,
        epoch=3,
    )


def test_a_step_runs_only_from_its_dispatched_predecessor_as_dispatched() -> None:
    msg = step_to(NodeId(1), (NodeId(3),))  # the gateway, then 1, then 3
    assert isinstance(check(msg, 0, 1), Dispatch)
    forwarded = replace(msg, route=())
    assert isinstance(check(forwarded, 1, 3), Dispatch)
    assert "node 2 sent it" in check(forwarded, 2, 3).reason  # type: ignore[union-attr]
    assert "does not name node 2" in check(msg, 0, 2).reason  # type: ignore[union-attr]
    for changed in (
        replace(msg, starts=(0,)),  # a cache cut back
        replace(msg, reply_to=NodeId(2)),
        replace(forwarded, route=(NodeId(2),)),
        replace(msg, last_only=False),
    ):
        refusal = check(changed, 0, 1) if changed.route != (NodeId(2),) else check(changed, 1, 3)
        assert isinstance(refusal, Refusal) and refusal.answer_to is None
    unsigned = replace(msg, dispatch=b"")
    assert check(unsigned, 0, 1).reason == "it carries no dispatch from the gateway"  # type: ignore[union-attr]
    wrong_epoch = dispatched(
        msg,
        peer=NodeId(0),
        me=NodeId(1),
        gateway=NodeId(0),
        gateways=(GATEWAY,),
        keys=PUBLIC,
        epoch=4,
    )
    assert isinstance(wrong_epoch, Refusal) and "epoch 3" in wrong_epoch.reason


def test_only_a_gateway_capable_signer_of_exactly_this_step_is_told_to_retry() -> None:
    """A takeover this node has not heard of yet: the new gateway (node 1, gateway-capable)
    gets a retriable answer, so its step does not wait out a timeout charged to the route.
    A step signed by a member that may not act as gateway, one signed for another route,
    or one signed with another key than its sender's, gets none: a liar could otherwise
    make honest nodes send errors for steps of its choosing."""
    early = step_to(NodeId(2), (), signer=NodeId(1))  # node 1, then 2
    refusal = check(replace(early), 1, 2, gateway=0)
    assert isinstance(refusal, Refusal) and refusal.answer_to == NodeId(1)
    by_a_stage_node = step_to(NodeId(1), (), signer=NodeId(3))
    refusal = check(by_a_stage_node, 3, 1, gateway=0)
    assert isinstance(refusal, Refusal) and refusal.answer_to is None
    elsewhere = check(early, 1, 3, gateway=0)  # its route does not name node 3
    assert isinstance(elsewhere, Refusal) and elsewhere.answer_to is None
    changed = check(replace(early, steps=(41,)), 1, 2, gateway=0)
    assert isinstance(changed, Refusal) and changed.answer_to is None
    forged = Dispatcher(NodeId(1), KEYS[NodeId(3)]).stamp(early, NodeId(2), 3).dispatch
    refusal = check(replace(early, dispatch=forged), 1, 2, gateway=1)
    assert isinstance(refusal, Refusal) and refusal.answer_to is None
    assert "not signed" in refusal.reason


def test_an_old_dispatch_replayed_is_stale() -> None:
    serials = Serials()
    first = decode(step_to(NodeId(1), ()).dispatch)
    second = decode(step_to(NodeId(1), ()).dispatch)  # a later one of the same gateway
    assert isinstance(first, Dispatch) and isinstance(second, Dispatch)
    assert second.serial > first.serial
    assert serials.stale(first) is None
    serials.ran(first)
    assert serials.stale(first) == "r"  # replayed
    assert serials.stale(second) is None
    serials.ran(second)
    assert serials.stale(first) == "r"
    other = decode(step_to(NodeId(1), (), signer=NodeId(1)).dispatch)  # a new gateway
    assert isinstance(other, Dispatch) and serials.stale(other) is None


def test_a_dispatch_replayed_after_its_request_was_forgotten_is_still_stale() -> None:
    """Only the last 4096 requests' serials are kept: one replayed after that ran again
    (its stage's cache cut back to the replayed step's start)."""
    serials = Serials(limit=2)
    tickets = []
    for i in range(4):
        ticket = decode(step_to(NodeId(1), ()).dispatch)
        assert isinstance(ticket, Dispatch)
        tickets.append(replace(ticket, request_ids=(RequestId(f"r{i}"),)))
    first, *later = tickets
    for t in tickets[:3]:
        serials.ran(t)  # r0 forgotten
    assert serials.stale(first) == "r0"
    assert serials.stale(replace(later[2], request_ids=first.request_ids)) is None  # newer
    assert serials.stale(later[2]) is None  # a request not seen yet, newer than the floor
    other = decode(step_to(NodeId(1), (), signer=NodeId(1)).dispatch)  # another gateway's
    assert isinstance(other, Dispatch) and serials.stale(replace(other, serial=0)) is None


def test_a_restarted_gateway_whose_clock_went_back_goes_on_above_its_serials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its resumed requests' steps were refused by every stage as replays, and timed out
    against the route's nodes: an honest node was evicted."""
    mark = tmp_path / "dispatch-serial"
    before = Dispatcher(GATEWAY, KEYS[GATEWAY], mark)
    used = [decode(before.stamp(step_to(NodeId(1), ()), NodeId(1), 3).dispatch) for _ in range(3)]
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now - 10**12)  # the clock 1000 s back
    after = Dispatcher(GATEWAY, KEYS[GATEWAY], mark)
    ticket = decode(after.stamp(step_to(NodeId(1), ()), NodeId(1), 3).dispatch)
    assert all(isinstance(t, Dispatch) for t in (*used, ticket))
    serials = Serials()
    for t in used:
        serials.ran(t)  # type: ignore[arg-type]
    assert serials.stale(ticket) is None  # type: ignore[arg-type]


def test_a_gateways_own_step_to_itself_is_not_verified_again_but_one_from_a_peer_is() -> None:
    msg = step_to(GATEWAY, (NodeId(1),))  # the gateway holds the first stage
    own = dict(peer=GATEWAY, me=GATEWAY, gateway=GATEWAY, gateways=(GATEWAY,), epoch=3)
    assert isinstance(dispatched(msg, keys={}, **own), Dispatch)  # no key needed: its own
    forged = replace(
        msg, dispatch=Dispatcher(GATEWAY, KEYS[NodeId(2)]).stamp(msg, GATEWAY, 3).dispatch
    )
    from_a_peer = dict(own, peer=NodeId(2))
    refusal = dispatched(forged, keys=PUBLIC, **from_a_peer)  # type: ignore[arg-type]
    assert isinstance(refusal, Refusal) and "not signed" in refusal.reason
