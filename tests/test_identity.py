"""Identity: the handshake proves each end's node key, frames are the authenticated
peer's, and each kind is taken only from the peer entitled to send it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.routes import EARLY_STEP_BYTES, StageRoutes
from butterfly.dataplane.stage_server import Outbound
from butterfly.metrics.events import MessageDropped, MetricsEvent
from butterfly.net.framing import LENGTH, Envelope, encode_frame
from butterfly.net.handshake import dialer_refusal, proof_bytes
from butterfly.net.memory import MemoryNetwork
from butterfly.net.tcp import TcpTransport, TransportLimits
from butterfly.protocol.entitled import Context, entitled
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.wire import encode_tensor
from butterfly.schedule.engine import ClusterHealth
from butterfly.types.errors import ConnectionFailed, SendTimeout
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.control import (
    AgreementFrame,
    ConfigLocal,
    ConfigPrepare,
    ConfigStatusQuery,
    ConfigSync,
    Hello,
    PlanAssign,
    StatusQuery,
    StatusReply,
)
from butterfly.types.wire.data import (
    KvAppend,
    Ping,
    Pong,
    Release,
    StageStep,
    StepError,
    StepResult,
)
from butterfly.types.wire.frames import Message
from tests.test_net import KEYS, Events, echo, identity, pair, started
from tests.test_routing import Seen, router

pytestmark = pytest.mark.timeout(60)

N = NodeId
# chain 1 [0, 2) -> 2 [2, 4); node 3 holds [0, 2) and node 4 [2, 4) as replicas
PLAN = StagePlan(
    1,
    ((N(1), LayerRange(0, 2)), (N(2), LayerRange(2, 4))),
    ((N(3), LayerRange(0, 2)), (N(4), LayerRange(2, 4))),
)


def ctx(me: int, sent_on: tuple[int, ...] = ()) -> Context:
    return Context(N(me), N(0), PLAN, tuple(N(n) for n in sent_on))


STEP = StageStep((RequestId("r"),), (1,), (0,), (1,), (), N(0), True)


# --- the rules, pure -------------------------------------------------------------------


def test_a_stage_step_comes_from_the_gateway_or_a_holder_of_the_range_before() -> None:
    assert entitled(STEP, N(0), ctx(1))  # the gateway feeds the first stage
    assert not entitled(STEP, N(2), ctx(1))  # the first stage has no previous one
    assert entitled(STEP, N(1), ctx(2)) and entitled(STEP, N(3), ctx(2))  # chain, lane
    assert not entitled(STEP, N(4), ctx(2))  # a holder of the same range
    assert not entitled(STEP, N(5), ctx(2))  # in no plan at all
    assert not entitled(STEP, N(0), Context(N(2), N(3), PLAN))  # node 0, not the gateway
    assert not entitled(STEP, N(1), Context(N(2), N(0), None))  # no plan: only the gateway


def test_results_come_from_the_route_the_step_was_sent_on() -> None:
    result = StepResult((RequestId("r"),), (1,), N(2))
    error = StepError((RequestId("r"),), (1,), N(2), "x", "broken", True)
    assert entitled(result, N(2), ctx(0, (1, 2)))
    assert not entitled(result, N(1), ctx(0, (1, 2)))  # a middle stage's result
    assert not entitled(result, N(4), ctx(0, (1, 2)))  # another lane's last node
    assert not entitled(result, N(2), ctx(0))  # a step nobody sent
    assert entitled(error, N(1), ctx(0, (1, 2))) and not entitled(error, N(3), ctx(0, (1, 2)))


def test_cache_copies_come_from_the_chain_node_of_their_range() -> None:
    copy = KvAppend(RequestId("r"), 2, 4, 0)
    assert entitled(copy, N(2), ctx(4))
    assert not entitled(copy, N(4), ctx(2))  # the standby does not copy to the chain
    assert not entitled(copy, N(1), ctx(4))  # another range's chain node
    assert not entitled(KvAppend(RequestId("r"), 0, 3, 0), N(1), ctx(3))  # no such range


@pytest.mark.parametrize(
    "msg",
    [
        Release((RequestId("r"),)),
        StatusQuery(),
        PlanAssign(1, (1, 0, 4), "m"),
        ConfigPrepare("d" * 64),
        ConfigSync(),  # a sync rewrites the node's config: the gateway's call alone
        ConfigLocal(),  # so do the gateway's role options it hands the standbys
    ],
)
def test_gateway_kinds_come_only_from_the_gateway(msg: Message) -> None:
    assert entitled(msg, N(0), ctx(2))
    assert not entitled(msg, N(1), ctx(2))
    assert entitled(msg, N(2), ctx(2))  # a node's own messages to itself


def test_member_kinds_and_kinds_nobody_sends() -> None:
    for msg in (Ping(1), ConfigStatusQuery(False), AgreementFrame()):
        assert entitled(msg, N(3), ctx(2))
    for msg in (Pong(1, 0), Hello(N(1), "c", "m", "data"), StatusReply(1, 1, (), 0, 0, 0, 0)):
        assert not entitled(msg, N(1), ctx(2))


def test_a_dialer_proof_binds_both_nonces_both_ends_and_the_direction() -> None:
    na, nd = b"a" * 32, b"d" * 32
    keys = {N(i): k.public for i, k in enumerate(KEYS[:2])}

    def hello(**changes: object) -> Hello:
        fields: dict[str, object] = dict(
            cluster_id="c",
            model_hash="m",
            channel="data",
            dialer=N(0),
            acceptor=N(1),
            dialer_nonce=nd,
            acceptor_nonce=na,
            direction="dial",
        )
        fields.update(changes)
        signature = KEYS[0].sign(proof_bytes(**fields))  # type: ignore[arg-type]
        return Hello(N(0), "c", "m", "data", nd, signature)

    def refusal(h: Hello) -> str:
        return dialer_refusal(
            h, acceptor=N(1), acceptor_nonce=na, cluster_id="c", model_hash="m", keys=keys
        )

    assert refusal(hello()) == ""
    assert "signature" in refusal(hello(acceptor_nonce=b"x" * 32))  # a replayed proof
    assert "signature" in refusal(hello(acceptor=N(2)))  # relayed from another acceptor
    assert "signature" in refusal(hello(direction="accept"))  # an acceptor's proof
    assert "signature" in refusal(dataclasses.replace(hello(), channel="control"))
    assert "not a member" in refusal(dataclasses.replace(hello(), node=N(5)))
    assert "nonce" in refusal(dataclasses.replace(hello(), nonce=b""))


# --- the handshake over real sockets ---------------------------------------------------


async def test_members_pass_and_each_end_proves_its_key() -> None:
    a, b, events = pair()
    try:
        await started(a, b)
        env = await a.request(N(1), StatusQuery(), timeout=5)
        assert isinstance(env.msg, StatusReply) and events.dropped() == 0
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("who", ["outsider_as_member", "member_with_wrong_key", "stranger"])
async def test_a_peer_without_its_member_key_is_refused(who: str) -> None:
    """An outsider with a fresh key that claims a member's id, a member whose key is not
    the one configured, and a node id outside the cluster: none gets a frame through,
    whatever it knows of the cluster id and model hash."""
    limits = TransportLimits(connect_attempts=1)
    _, b, events = pair(limits=limits)
    key = {
        "outsider_as_member": SigningKey.generate(),
        "member_with_wrong_key": KEYS[2],
        "stranger": KEYS[2],
    }[who]
    node = 5 if who == "stranger" else 0
    seen = Seen()
    attacker = TcpTransport(
        identity=dataclasses.replace(identity(0, key=key), node=N(node)),
        listen=("127.0.0.1", 0),
        peers={N(1): ("127.0.0.1", 0)},
        emit=Events(),
        epoch=lambda: 3,
        limits=limits,
    )
    try:
        await b.start(seen)
        await attacker.start(echo)
        attacker.peers[N(1)] = b.address
        with pytest.raises(ConnectionFailed, match="refused the handshake"):
            await attacker.send(N(1), Release((RequestId("r"),)))
        drops = [e for e in events if isinstance(e, MessageDropped)]
        assert [e.reason for e in drops] == ["handshake_refused"]
        assert seen.calls == []
    finally:
        await attacker.close()
        await b.close()


async def test_the_dialer_refuses_an_acceptor_that_cannot_prove_its_key() -> None:
    """The node at node 1's address holds another key: node 0 sends it nothing."""
    limits = TransportLimits(connect_attempts=1)
    a, _, events = pair(limits=limits)
    seen = Seen()
    impostor = TcpTransport(
        identity=identity(1, key=KEYS[2]),
        listen=("127.0.0.1", 0),
        peers={N(0): ("127.0.0.1", 0), N(1): ("127.0.0.1", 0)},
        emit=events,
        epoch=lambda: 3,
        limits=limits,
    )
    try:
        await impostor.start(seen)
        await a.start(echo)
        a.peers[N(1)] = impostor.address
        with pytest.raises(ConnectionFailed, match="does not prove its key"):
            await a.send(N(1), Release((RequestId("r"),)))
        assert any(isinstance(e, MessageDropped) for e in events)
        assert seen.calls == []
    finally:
        await a.close()
        await impostor.close()


async def test_a_huge_first_frame_is_refused_before_its_body_is_read() -> None:
    """A 256 MiB length before the handshake: the node closes at once (it would wait for
    the body until its 30 s connect timeout if it read it), and counts the drop."""
    _, b, events = pair(limits=TransportLimits(connect_timeout_s=30.0))
    try:
        await b.start(echo)
        reader, writer = await asyncio.open_connection(*b.address)
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        assert length < 4096  # the node's own opening hello
        await reader.readexactly(length)
        writer.write(LENGTH.pack(256 << 20) + b"x" * 1024)
        await writer.drain()
        async with asyncio.timeout(10):  # far below the connect timeout
            assert await reader.read() == b""  # closed by the node
        writer.close()
        drops = [e for e in events if isinstance(e, MessageDropped)]
        assert [e.reason for e in drops] == ["handshake"]
    finally:
        await b.close()


async def test_a_hello_frame_over_a_few_kib_is_refused() -> None:
    _, b, events = pair()
    try:
        await b.start(echo)
        reader, writer = await asyncio.open_connection(*b.address)
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        await reader.readexactly(length)
        big = Envelope(Hello(N(0), "c", "m" * 5000, "data", b"n" * 32), N(0), 0, "c")
        writer.write(encode_frame(big))
        await writer.drain()
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()
        assert events.dropped() == 1
    finally:
        await b.close()


# --- attribution and entitlement in the router and the engine --------------------------


async def test_the_router_drops_a_kind_from_a_peer_not_entitled_to_it() -> None:
    """Node 2 (not the gateway, not the chain node of [0, 2)) releases a request and
    copies a cache to node 3: both dropped and counted; the gateway's release passes."""
    net, events = MemoryNetwork(cluster_id="c"), Events()
    routers = {}
    for n in (0, 2, 3):
        routers[n] = router(n, net.transport(N(n), events), events)
        routers[n]._plan = lambda: PLAN
    releases, copies = Seen(), Seen()
    await routers[0].start({})
    await routers[2].start({})
    await routers[3].start({Release: releases, KvAppend: copies})
    await routers[2].deliver(N(3), Release((RequestId("r"),)))
    await routers[2].deliver(N(3), KvAppend(RequestId("r"), 0, 2, 0))
    await routers[0].deliver(N(3), Release((RequestId("r"),)))
    await asyncio.wait_for(releases.arrived.wait(), 5)
    for _ in range(100):
        if events.dropped() == 2:
            break
        await asyncio.sleep(0.01)
    reasons = sorted(e.reason for e in events if isinstance(e, MessageDropped))
    assert reasons == ["not_entitled_kv_append", "not_entitled_release"]
    assert releases.calls == [(0, 0, "release")] and copies.calls == []
    for r in routers.values():
        await r.close()


async def test_the_engine_takes_a_result_only_from_the_last_node_of_the_route() -> None:
    """Node 3 (a replica of the first stage) answers every step first, with logits for
    token 5; node 2, the chain's last node, then answers with token 3. Only node 2's
    answers are used, and node 3's are counted as dropped."""
    events: list[MetricsEvent] = []
    holder: list[PipelineEngine] = []

    def answer(msg: StageStep, token: int, sender: int) -> Envelope:
        logits = torch.zeros(1, sum(msg.lengths), 8)
        logits[..., token] = 1.0
        result = StepResult(msg.request_ids, msg.steps, N(sender))
        return Envelope(result, N(sender), 1, "c", 0, False, encode_tensor(logits))

    async def deliver(peer: NodeId, msg: Message, payload: bytes) -> None:
        if isinstance(msg, StageStep):
            assert peer == N(1) and msg.route == (N(2),)
            engine = holder[0]
            await engine.on_result(N(3), answer(msg, 5, 3))  # forged, arrives first
            await engine.on_result(N(2), answer(msg, 3, 2))

    def health() -> ClusterHealth:
        raise AssertionError("not asked")

    engine = PipelineEngine(
        node=N(0),
        deliver=deliver,
        plan=lambda: PLAN,
        health=health,
        max_context=64,
        input_kind="tokens",
        eos_ids=frozenset(),
        step_timeout_s=30.0,
        max_tensor_bytes=1 << 20,
        emit=events.append,
    )
    holder.append(engine)
    runner = asyncio.create_task(engine.serve_batches())
    try:
        task = InferenceTask(RequestId("r1"), input_ids=(1, 2), max_new_tokens=3)
        async with asyncio.timeout(30):
            result = await engine.run(task, lambda token: None)
    finally:
        runner.cancel()
    assert result.output_ids == (3, 3, 3)
    drops = [e for e in events if isinstance(e, MessageDropped)]
    assert [e.reason for e in drops] == ["not_entitled_step_result"] * 3


async def test_a_reply_claiming_another_sender_is_dropped_and_counted() -> None:
    """Replies are attributed to the connection too: node 1 answers under node 7's id, so
    node 0's request is never answered (and the drop is counted)."""
    a, b, events = pair()
    try:
        await started(a, b)
        await a.request(N(1), StatusQuery(), timeout=5)  # the connection exists now
        for conn in b._incoming:
            conn.node = N(7)  # what node 1 writes in its replies from now on
        with pytest.raises(SendTimeout):
            await a.request(N(1), StatusQuery(), timeout=0.5)
        drops = [e for e in events if isinstance(e, MessageDropped)]
        assert [e.reason for e in drops] == ["sender_mismatch"]
    finally:
        await a.close()
        await b.close()


class StepsSeen:
    """The stage server's side of a step, as StageRoutes uses it: records what it ran."""

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.plan, self.epoch = PLAN, PLAN.epoch

    async def plan_of(self, epoch: int) -> StagePlan:
        return PLAN

    def admit(self, msg: StageStep, peer: NodeId, gateway: NodeId, *rest: object) -> tuple[()]:
        return ()  # records are not checked here

    async def on_step(self, env: Envelope, route: object = ()) -> Outbound:
        self.ran.append(env.sender)
        assert isinstance(env.msg, StageStep)
        return Outbound(N(0), StepResult(env.msg.request_ids, env.msg.steps, N(2)))

    def kv_deltas(self, request_ids: object) -> list[Outbound]:
        return []

    def stage_index(self) -> int | None:
        return 1


async def test_a_stage_runs_steps_only_from_the_gateway_or_the_previous_stage() -> None:
    """Node 2 holds [2, 4): a step from node 4 (a holder of the same range) would write
    into node 2's KV caches; it is dropped and counted, and node 1's step runs."""
    events: list[MetricsEvent] = []
    sent: list[tuple[NodeId, Message]] = []

    async def deliver(peer: NodeId, msg: Message, payload: bytes) -> None:
        sent.append((peer, msg))

    server = StepsSeen()
    routes = StageRoutes(node=N(2), server=server, deliver=deliver, emit=events.append)  # type: ignore[arg-type]
    await routes.step(N(4), Envelope(STEP, N(4), 1, "c"))
    await routes.step(N(1), Envelope(STEP, N(1), 1, "c"))
    assert server.ran == [1] and [peer for peer, _ in sent] == [0]
    drops = [e for e in events if isinstance(e, MessageDropped)]
    assert [e.reason for e in drops] == ["not_entitled_stage_step"]


class PlanNeverComes(StepsSeen):
    """A stage server at epoch 1 whose next plan does not come while the test runs."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def plan_of(self, epoch: int) -> StagePlan:
        if epoch > self.epoch:
            self.waiting += 1
            await asyncio.Event().wait()
        return PLAN


async def test_steps_of_a_later_epoch_hold_few_bytes_per_peer_while_they_wait() -> None:
    """A step stamped with a later epoch waits for that plan before it can be judged,
    and the epoch is the unsigned envelope's: node 3 (no route to node 2) parked 48
    steps of 16 MiB, 768 MiB held for 10 s each. A peer's waiting steps now hold at most
    the budget (one always may wait); the rest are dropped at once and counted, another
    peer's steps still wait, and a step of the current epoch runs."""
    events: list[MetricsEvent] = []

    async def deliver(peer: NodeId, msg: Message, payload: bytes) -> None:
        return None

    server = PlanNeverComes()
    routes = StageRoutes(node=N(2), server=server, deliver=deliver, emit=events.append)  # type: ignore[arg-type]
    big = bytes(16 << 20)
    steps = [
        asyncio.create_task(routes.step(N(3), Envelope(STEP, N(3), 2, "c", payload=big)))
        for _ in range(48)
    ]
    steps.append(asyncio.create_task(routes.step(N(1), Envelope(STEP, N(1), 2, "c", payload=big))))
    try:
        await asyncio.sleep(0.05)
        assert server.waiting == EARLY_STEP_BYTES // len(big) + 1
        drops = [e.reason for e in events if isinstance(e, MessageDropped)]
        assert drops == ["early_stage_step_over_budget"] * (48 - EARLY_STEP_BYTES // len(big))
        await routes.step(N(1), Envelope(STEP, N(1), 1, "c"))
        assert server.ran == [1]
        for step in steps:  # their waits end: node 3's steps may wait again
            step.cancel()
        await asyncio.gather(*steps, return_exceptions=True)
        steps = [asyncio.create_task(routes.step(N(3), Envelope(STEP, N(3), 2, "c", payload=big)))]
        await asyncio.sleep(0.05)
        assert server.waiting == EARLY_STEP_BYTES // len(big) + 2
        assert sum(isinstance(e, MessageDropped) for e in events) == len(drops)
    finally:
        for step in steps:
            step.cancel()
        await asyncio.gather(*steps, return_exceptions=True)
