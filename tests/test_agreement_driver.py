"""The live PBFT driver on the in-memory transport: 4 nodes, f = 1, real codecs and keys.

Each test breaks if its rule breaks: the same commands in the same order on every node,
progress with one node silent (a backup, or the primary: a view change), a returning node
catching up by replay, a command that cannot commit timing out, garbage dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from butterfly.agreement.driver import AgreementDriver
from butterfly.metrics.events import MessageDropped, MetricsEvent
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol import pbft
from butterfly.protocol.evidence import valid_evidence
from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.sign import SigningKey
from butterfly.testing.liar_votes import EquivocatingDriver
from butterfly.types.errors import ConsensusTimeout
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import Evidence, Request
from butterfly.types.wire.control import AgreementFrame
from butterfly.types.wire.frames import Message

KEYS = [SigningKey.from_seed(bytes([i + 7]) * 32) for i in range(4)]
pytestmark = pytest.mark.timeout(60)


def pbft_config(i: int, n: int = 4, f: int = 1, history: int = 1024) -> PbftConfig:
    keys = tuple(k.public for k in KEYS[:n])
    return PbftConfig(
        history=history,
        replica=NodeId(i),
        keys=keys,
        f=f,
        clients={NodeId(j): k for j, k in enumerate(keys)},
        checkpoint_interval=4,
        window=8,
        request_timeout=0.5,
        view_change_timeout=0.5,
        retransmit_interval=0.05,
        idle_status_interval=0.2,
    )


@dataclass
class Cluster:
    net: MemoryNetwork
    drivers: dict[int, AgreementDriver] = field(default_factory=dict)
    logs: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    events: list[MetricsEvent] = field(default_factory=list)
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    liars: dict[int, type[AgreementDriver]] = field(default_factory=dict)
    evidence: dict[int, list[Evidence]] = field(default_factory=dict)
    history: int = 1024
    vetoes: dict[int, Callable[[Request], str | None]] = field(default_factory=dict)
    data_dir: Path | None = None  # where each node keeps how far it signed (a restart reads it)

    async def start(self, i: int) -> None:
        """(Re)start node i from an empty replica, as a restarted process would."""
        transport = self.net.transport(NodeId(i), self.events.append)
        self.logs[i] = log = []
        self.evidence[i] = proofs = []

        async def on_commit(seq: int, command: bytes) -> None:
            log.append((seq, command))

        async def on_evidence(evidence: Evidence) -> None:
            proofs.append(evidence)

        config = pbft_config(i, history=self.history)
        if i in self.vetoes:
            config = dataclasses.replace(config, veto=self.vetoes[i])
        driver = self.liars.get(i, AgreementDriver)(
            config=config,
            key=KEYS[i],
            transport=transport,
            on_commit=on_commit,
            on_evidence=on_evidence,
            emit=self.events.append,
            signed_path=None if self.data_dir is None else self.data_dir / f"{i}.json",
        )

        async def handle(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
            if isinstance(env.msg, AgreementFrame):
                await driver.on_frame(env)
            return None

        await transport.start(handle)
        self.drivers[i] = driver
        self.tasks[i] = asyncio.create_task(driver.run())

    async def stop(self, i: int) -> None:
        self.tasks[i].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.tasks[i]
        await self.net.nodes[NodeId(i)].close()

    def commands(self, i: int) -> list[bytes]:
        return [c for _, c in self.logs[i]]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster(MemoryNetwork())
    for i in range(4):
        await c.start(i)
    try:
        yield c
    finally:
        for i in list(c.tasks):
            if not c.tasks[i].done():
                await c.stop(i)


async def wait_until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_commands_commit_in_the_same_order_everywhere(cluster: Cluster) -> None:
    proposals = [
        cluster.drivers[i].propose(f"node{i}-cmd{k}".encode(), timeout=10.0)
        for k in range(5)
        for i in range(4)
    ]
    seqs = await asyncio.gather(*proposals)
    assert sorted(seqs) == list(range(1, 21))  # each command once, no gaps
    await wait_until(lambda: all(len(cluster.logs[i]) == 20 for i in range(4)))
    reference = cluster.logs[0]
    assert all(cluster.logs[i] == reference for i in range(4))
    expected = {f"node{i}-cmd{k}".encode() for k in range(5) for i in range(4)}
    assert set(cluster.commands(0)) == expected
    for seq, (i, k) in zip(seqs, [(i, k) for k in range(5) for i in range(4)], strict=True):
        assert dict(reference)[seq] == f"node{i}-cmd{k}".encode()  # propose said where


async def test_a_silent_backup_does_not_stop_progress(cluster: Cluster) -> None:
    cluster.net.down.add(NodeId(3))
    for k in range(6):
        await cluster.drivers[k % 3].propose(f"c{k}".encode(), timeout=10.0)
    await wait_until(lambda: all(len(cluster.logs[i]) == 6 for i in range(3)))
    assert cluster.logs[0] == cluster.logs[1] == cluster.logs[2]
    assert cluster.logs[3] == []


async def test_a_silent_primary_is_replaced_by_a_view_change(cluster: Cluster) -> None:
    await cluster.drivers[1].propose(b"before", timeout=10.0)
    cluster.net.down.add(NodeId(0))  # the primary of view 0
    seq = await cluster.drivers[2].propose(b"after", timeout=15.0)
    assert seq == 2
    await wait_until(lambda: all(len(cluster.logs[i]) == 2 for i in (1, 2, 3)))
    assert all(cluster.commands(i) == [b"before", b"after"] for i in (1, 2, 3))
    assert all(cluster.drivers[i].view >= 1 for i in (1, 2, 3))


async def test_a_restarted_node_replays_the_log_it_missed(cluster: Cluster) -> None:
    await cluster.drivers[0].propose(b"seen", timeout=10.0)
    await wait_until(lambda: len(cluster.logs[3]) == 1)
    await cluster.stop(3)
    for k in range(10):  # past a stable checkpoint (interval 4): replay needs state transfer
        await cluster.drivers[k % 3].propose(f"missed{k}".encode(), timeout=10.0)
    await cluster.start(3)  # a fresh process: empty replica, empty log
    await wait_until(lambda: len(cluster.logs[3]) == 11)
    assert cluster.logs[3] == cluster.logs[0]
    seq = await cluster.drivers[3].propose(b"back", timeout=10.0)
    assert seq == 12
    await wait_until(lambda: all(len(cluster.logs[i]) == 12 for i in range(4)))
    assert all(cluster.logs[i] == cluster.logs[0] for i in range(4))


async def test_a_proposal_the_backups_vetoed_on_arrival_commits_once_they_support_it() -> None:
    """A takeover's shape: the acting gateway was also the primary and died; its successor's
    detector declared it failed first and proposed, the other backups' detectors a few
    heartbeats later, so they vetoed the request when it arrived and dropped it. The new
    primary must still come to order it once they agree (the proposer sends it again);
    before, it was ordered by nobody and `propose` waited out its whole timeout."""
    supports = {1: False, 3: False}

    def veto(i: int) -> Callable[[Request], str | None]:
        def check(request: Request) -> str | None:
            if request.operation != b"takeover" or supports[i]:
                return None
            return f"node {i} still hears the gateway"

        return check

    c = Cluster(MemoryNetwork(), vetoes={1: veto(1), 3: veto(3)})
    for i in range(4):
        await c.start(i)
    try:
        await c.drivers[1].propose(b"before", timeout=10.0)
        await c.drivers[3].propose(b"before too", timeout=10.0)
        c.net.down.add(NodeId(0))  # the primary of view 0 dies
        proposal = asyncio.create_task(c.drivers[2].propose(b"takeover", timeout=5.0))
        await asyncio.sleep(0.1)  # the request reached the backups, which vetoed it
        for i in (1, 2, 3):
            c.drivers[i].suspect_primary(NodeId(0))  # every detector declares it failed
        await asyncio.sleep(0.1)
        supports.update({1: True, 3: True})  # now theirs agree with the proposer's
        seq = await proposal
        assert seq == 3
        await wait_until(lambda: all(len(c.logs[i]) == 3 for i in (1, 2, 3)))
        assert all(c.commands(i)[-1] == b"takeover" for i in (1, 2, 3))
    finally:
        for i in list(c.tasks):
            if not c.tasks[i].done():
                await c.stop(i)


async def test_without_a_quorum_a_command_times_out(cluster: Cluster) -> None:
    cluster.net.down.update({NodeId(2), NodeId(3)})  # two silent nodes: more than f
    with pytest.raises(ConsensusTimeout, match="not committed"):
        await cluster.drivers[0].propose(b"stuck", timeout=0.5)
    assert cluster.logs[0] == []


async def test_garbage_and_strangers_are_dropped_and_counted(cluster: Cluster) -> None:
    driver = cluster.drivers[1]
    for sender, payload in ((0, b"\x93garbage"), (0, b""), (9, b"x"), (1, b"\x80")):
        await driver.on_frame(Envelope(AgreementFrame(), sender, 0, "test", payload=payload))
    reasons = [e.reason for e in cluster.events if isinstance(e, MessageDropped)]
    assert reasons.count("agreement_invalid") >= 2 and "agreement_stranger" in reasons
    assert await cluster.drivers[0].propose(b"still fine", timeout=10.0) == 1


async def test_a_restarted_primary_is_replaced_and_the_log_stays_one(cluster: Cluster) -> None:
    for k in range(3):
        await cluster.drivers[1].propose(f"before{k}".encode(), timeout=10.0)
    await cluster.stop(0)
    await cluster.start(0)  # the primary of view 0 comes back with an empty replica
    seq = await cluster.drivers[0].propose(b"after", timeout=15.0)
    assert seq == 4
    await wait_until(lambda: all(len(cluster.logs[i]) == 4 for i in range(4)))
    assert all(cluster.logs[i] == cluster.logs[1] for i in range(4))
    assert cluster.commands(0) == [b"before0", b"before1", b"before2", b"after"]


@pytest.mark.parametrize("persisted", [True, False])
async def test_a_primary_restarted_at_once_is_not_convicted_of_equivocation(
    tmp_path: Path, persisted: bool
) -> None:
    """Back before its peers' timers fire, the primary of view 0 is still theirs; the
    next command must not take a sequence number it signed before the crash (its peers
    hold those pre-prepares). Without the file it does, and every peer convicts it."""
    c = Cluster(MemoryNetwork(), data_dir=tmp_path if persisted else None)
    for i in range(4):
        await c.start(i)
    try:
        for k in range(3):
            await c.drivers[1].propose(f"before{k}".encode(), timeout=10.0)
        await c.stop(0)
        await c.start(0)
        if persisted:
            assert (tmp_path / "0.json").exists()
            assert c.drivers[0].state.signed_before == pbft.Signed(0, 0, 3)
        await c.drivers[1].propose(b"after", timeout=15.0)
        await wait_until(lambda: all(c.commands(i)[-1:] == [b"after"] for i in range(4)))
        await asyncio.sleep(0.3)  # statuses and relays go round
        convicted = {i: [e.accused for e in c.evidence[i]] for i in range(4) if c.evidence[i]}
        assert (convicted == {}) is persisted, convicted
        if persisted:
            assert all(c.logs[i] == c.logs[1] for i in range(4))
    finally:
        for i in list(c.tasks):
            if not c.tasks[i].done():
                await c.stop(i)


async def test_an_equivocating_voter_is_reported_by_honest_nodes_and_commits_go_on() -> None:
    c = Cluster(MemoryNetwork(), liars={2: EquivocatingDriver})
    for i in range(4):
        await c.start(i)
    try:
        for k in range(3):
            await c.drivers[k % 2].propose(f"c{k}".encode(), timeout=10.0)
        await wait_until(lambda: all(len(c.logs[i]) == 3 for i in (0, 1, 3)))
        assert c.logs[0] == c.logs[1] == c.logs[3]
        # every honest node hears of it: from its own pair of votes, or a peer's report
        await wait_until(lambda: all(c.evidence[i] for i in (0, 1, 3)))
        keys = pbft_config(0).keys
        for i in (0, 1, 3):
            assert {e.accused for e in c.evidence[i]} == {2}
            assert all(valid_evidence(e, keys) for e in c.evidence[i])
        counted = [(e.accused, e.first.kind, e.first.view, e.first.seq) for e in c.evidence[0]]
        assert len(counted) == len(set(counted)), "each slot's evidence is reported once"
    finally:
        for i in list(c.tasks):
            await c.stop(i)


async def test_executed_requests_are_forgotten_past_the_kept_history() -> None:
    """The driver's record of executed requests (its duplicate check) is bounded by the
    history PBFT keeps, and a duplicate inside it still runs once."""
    c = Cluster(MemoryNetwork(), history=8)
    for i in range(4):
        await c.start(i)
    try:
        for k in range(60):
            await c.drivers[k % 4].propose(f"cmd{k}".encode(), timeout=10.0)
        await wait_until(lambda: all(len(c.logs[i]) == 60 for i in range(4)))
        for i in range(4):
            kept = c.drivers[i]._ran  # the bound is the behaviour tested
            assert len(kept) <= 8 + 2 * 4, (i, len(kept))  # history + checkpoint slack
        assert all(c.logs[i] == c.logs[0] for i in range(4))
        assert len(set(c.commands(0))) == 60  # each command once
    finally:
        for i in list(c.tasks):
            await c.stop(i)
