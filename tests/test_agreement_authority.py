"""Each command kind only from its authorized proposer (agreement.authority).

The pure rule first, then the live agreement: four PBFT drivers over the in-memory
transport, configured as `agreement.build` configures them (node 0 the gateway, node 1
the first primary). A member that orders commands that are not its own, even as the
primary that signs the pre-prepare and its own commit, gets none of them executed on any
node, and the cluster goes on ordering the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from butterfly.agreement.authority import (
    UnauthorizedCommand,
    admission,
    authorized,
    request_refusal,
)
from butterfly.agreement.driver import AgreementDriver
from butterfly.metrics.events import MessageDropped, MetricsEvent
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.sign import SigningKey
from butterfly.testing.liar_votes import UsurpingDriver
from butterfly.types.ids import GATEWAY, Epoch, NodeId
from butterfly.types.wire.agreement import Request
from butterfly.types.wire.commands import (
    Command,
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    NewPlan,
    ResumeNode,
    SuspendNode,
    encode_command,
)
from butterfly.types.wire.control import AgreementFrame
from butterfly.types.wire.frames import Message

KEYS = [SigningKey.from_seed(bytes([i + 31]) * 32) for i in range(4)]
pytestmark = pytest.mark.timeout(60)

PLAN = NewPlan(Epoch(5), (1, 0, 2, 2, 2, 4))
UPDATE = ConfigUpdate(b"{}", 1, 7, (NodeId(0),), (0,), (b"s" * 64,))
EVERY_KIND: tuple[Command, ...] = (
    PLAN,
    EvictNode(NodeId(2), "an honest node"),
    SuspendNode(NodeId(2), 1, "left its steps unanswered"),
    ResumeNode(NodeId(2)),
    UPDATE,
    ConfigAbort("ab" * 32, 7),
)


# --- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", EVERY_KIND, ids=lambda c: c.kind)
def test_every_kind_comes_from_the_gateway_only(command: Command) -> None:
    assert authorized(command, GATEWAY) is None
    for member in (1, 2, 3):
        reason = authorized(command, NodeId(member))
        assert reason is not None and command.kind in reason and f"node {member}" in reason


def test_a_liar_cannot_evict_itself_and_the_gateway_is_not_evicted() -> None:
    """Self-eviction (to leave with a reason of its own choosing before the gateway's
    eviction) is a member proposing an eviction: refused like any other."""
    assert authorized(EvictNode(NodeId(3), "leaving"), NodeId(3)) is not None
    assert authorized(EvictNode(GATEWAY, "by its own hand"), GATEWAY) is not None
    assert authorized(SuspendNode(GATEWAY, 1, "by its own hand"), GATEWAY) is not None


def test_a_request_is_judged_by_its_signer_and_garbage_is_refused() -> None:
    def request(sender: int, operation: bytes) -> Request:
        return Request(NodeId(sender), Epoch(0), 1, operation)

    plan = encode_command(PLAN)
    assert request_refusal(request(0, plan)) is None
    assert request_refusal(request(2, plan)) is not None
    assert "not a command" in (request_refusal(request(0, b"\x93garbage")) or "")
    authorize = admission(NodeId(3))  # another gateway: the rule follows it
    assert authorize(request(3, plan)) is None and authorize(request(0, plan)) is not None


# --- the live agreement -----------------------------------------------------------------


def config(i: int) -> PbftConfig:
    keys = tuple(k.public for k in KEYS)
    return PbftConfig(
        replica=NodeId(i),
        keys=keys,
        f=1,
        clients={NodeId(j): k for j, k in enumerate(keys)},
        checkpoint_interval=4,
        window=8,
        request_timeout=0.3,
        view_change_timeout=0.3,
        initial_view=1,  # as protocol.keys.pbft_config: node 1 is the first primary
        retransmit_interval=0.05,
        idle_status_interval=0.2,
        authorize=admission(),  # as agreement.build sets it
    )


@dataclass
class Cluster:
    liar: int
    net: MemoryNetwork = field(default_factory=MemoryNetwork)
    drivers: dict[int, AgreementDriver] = field(default_factory=dict)
    logs: dict[int, list[bytes]] = field(default_factory=dict)
    events: list[MetricsEvent] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        for i in range(4):
            transport = self.net.transport(NodeId(i), self.events.append)
            self.logs[i] = log = []

            async def on_commit(seq: int, command: bytes, log: list[bytes] = log) -> None:
                log.append(command)

            kind = UsurpingDriver if i == self.liar else AgreementDriver
            driver = kind(
                config=config(i),
                key=KEYS[i],
                transport=transport,
                on_commit=on_commit,
                emit=self.events.append,
            )

            async def handle(
                peer: NodeId, env: Envelope, driver: AgreementDriver = driver
            ) -> tuple[Message, bytes] | None:
                if isinstance(env.msg, AgreementFrame):
                    await driver.on_frame(env)
                return None

            await transport.start(handle)
            self.drivers[i] = driver
            self.tasks.append(asyncio.create_task(driver.run()))

    def usurper(self) -> UsurpingDriver:
        driver = self.drivers[self.liar]
        assert isinstance(driver, UsurpingDriver)
        return driver


@pytest.fixture(params=[1, 2], ids=["liar-is-primary", "liar-is-backup"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    c = Cluster(liar=request.param)
    await c.start()
    try:
        yield c
    finally:
        for task in c.tasks:
            task.cancel()
        for task in c.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_commands_a_member_orders_never_execute_anywhere(cluster: Cluster) -> None:
    """The member orders a plan, the eviction of an honest node and of itself, and a
    config change (as the primary it also pre-prepares and commits each); the gateway's
    own plan, proposed after them, executes on every node, and nothing else does."""
    liar = cluster.usurper()
    usurped = [
        PLAN,
        EvictNode(NodeId(3), "honest node 3"),
        EvictNode(NodeId(liar.me), "leaving quietly"),
        UPDATE,
    ]
    for command in usurped:
        liar.usurp(encode_command(command))
    honest = encode_command(NewPlan(Epoch(6), (0, 0, 4)))
    await cluster.drivers[0].propose(honest, timeout=20.0)
    await wait_until(lambda: all(honest in log for log in cluster.logs.values()))
    for log in cluster.logs.values():
        assert log == [honest]  # the usurped commands, before it, are nowhere
    reasons = [e.reason for e in cluster.events if isinstance(e, MessageDropped)]
    assert "agreement_unauthorized" in reasons  # refused on arrival, and counted
    assert "agreement_unauthorized_executed" not in reasons  # never even agreed


async def test_an_honest_member_is_told_at_once_it_may_not_propose(cluster: Cluster) -> None:
    with pytest.raises(UnauthorizedCommand, match="gateway"):
        await cluster.drivers[3].propose(encode_command(PLAN), timeout=5.0)
    with pytest.raises(UnauthorizedCommand, match="not a command"):
        await cluster.drivers[0].propose(b"opaque bytes", timeout=5.0)
    assert await cluster.drivers[0].propose(encode_command(PLAN), timeout=20.0) == 1
