"""Cluster-wide config changes on 4 in-process nodes (f = 1) over the in-memory transport.

Real parts throughout: ConfigManagers with SQLite histories, the PBFT driver, signed
PREPARE votes, the coordinator's PROPOSE/PREPARE/COMMIT/FINALIZE. Faults come from
composition: a subscriber that refuses, a node taken off the network, a node whose
agreement frames are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from butterfly.agreement.authority import UnauthorizedCommand, admission
from butterfly.agreement.config_coordinator import ConfigCoordinator, ConfigRejected, ConfigTimeout
from butterfly.agreement.config_replica import ConfigReplica
from butterfly.agreement.driver import AgreementDriver
from butterfly.config import (
    ButterflyConfig,
    ConfigHistory,
    ConfigInvalid,
    ConfigManager,
    UpdateRefused,
    apply_patch,
    load_config,
)
from butterfly.config.proposal import propose_update, resume_committed
from butterfly.metrics.events import discard
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.sign import SigningKey
from butterfly.types.ids import NodeId
from butterfly.types.wire.commands import ConfigAbort, ConfigUpdate, decode_command, encode_command
from butterfly.types.wire.control import AgreementFrame
from butterfly.types.wire.frames import Message

N = 4
KEYS = [SigningKey.from_seed(bytes([i + 40]) * 32) for i in range(N)]
MEMBERS = [f"127.0.0.1:{9100 + i}" for i in range(N)]
pytestmark = pytest.mark.timeout(60)


def node_config(i: int) -> ButterflyConfig:
    return load_config(
        overrides={
            "cluster.members": MEMBERS,
            "cluster.public_keys": [k.public.hex() for k in KEYS],
            "node.id": i,
            "node.listen": MEMBERS[i],
            "byzantine.f": 1,
        }
    )


def pbft_config(i: int) -> PbftConfig:
    keys = tuple(k.public for k in KEYS)
    return PbftConfig(
        replica=NodeId(i),
        keys=keys,
        f=1,
        clients={NodeId(j): k for j, k in enumerate(keys)},
        checkpoint_interval=4,
        window=8,
        request_timeout=0.5,
        view_change_timeout=0.5,
        retransmit_interval=0.05,
        idle_status_interval=0.2,
        authorize=admission(),  # as agreement.build sets it: config commands from node 0
    )


@dataclass
class Node:
    replica: ConfigReplica
    driver: AgreementDriver
    coordinator: ConfigCoordinator
    task: asyncio.Task[None]

    @property
    def manager(self) -> ConfigManager:
        return self.replica.manager


@dataclass
class Cluster:
    net: MemoryNetwork
    data: Path
    nodes: dict[int, Node] = field(default_factory=dict)
    muted: set[int] = field(default_factory=set)  # nodes that ignore agreement frames

    def live(self, n: NodeId) -> bool:
        return n in self.net.nodes and n not in self.net.down

    async def start(self, i: int) -> Node:
        """Start node i from its history, as a restarted process would."""
        history = ConfigHistory(self.data / f"node-{i}" / "history.sqlite3")
        manager = ConfigManager(resume_committed(node_config(i), history), history)
        transport = self.net.transport(NodeId(i), discard)
        replica = ConfigReplica(
            node=NodeId(i),
            manager=manager,
            key=KEYS[i],
            keys=tuple(k.public for k in KEYS),
            f=1,
            transport=transport,
        )

        async def on_commit(seq: int, data: bytes) -> None:
            command = decode_command(data)
            if isinstance(command, ConfigUpdate | ConfigAbort):
                replica.execute(command)

        driver = AgreementDriver(
            config=pbft_config(i), key=KEYS[i], transport=transport, on_commit=on_commit
        )

        async def handle(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
            if isinstance(env.msg, AgreementFrame):
                if i not in self.muted:
                    await driver.on_frame(env)
                return None
            return await replica.on_message(peer, env)

        async def propose(command: bytes, timeout: float) -> int:
            return await driver.propose(command, timeout=timeout)

        coordinator = ConfigCoordinator(
            replica=replica,
            transport=transport,
            propose=propose,
            members=tuple(NodeId(j) for j in range(N)),
            f=1,
            live=self.live,
            timeout_s=2.0,
        )
        await transport.start(handle)
        node = Node(replica, driver, coordinator, asyncio.create_task(driver.run()))
        self.nodes[i] = node
        return node

    async def stop(self, i: int) -> None:
        node = self.nodes.pop(i)
        node.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await node.task
        await self.net.nodes[NodeId(i)].close()
        node.manager.history.close()

    def hashes(self) -> set[str]:
        return {n.manager.record.cluster_hash for n in self.nodes.values()}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(MemoryNetwork(), tmp_path)
    for i in range(N):
        await c.start(i)
    try:
        yield c
    finally:
        for i in list(c.nodes):
            await c.stop(i)


async def wait_until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_an_update_commits_on_every_node_at_one_sequence_number(cluster: Cluster) -> None:
    gateway = cluster.nodes[0].coordinator
    result = await gateway.update({"partition.strategy": "uniform"}, reason="test")
    assert result.seq == 1 and result.nodes == {i: "applied" for i in range(N)}
    assert [c.key for c in result.changes] == ["partition.strategy"]
    for node in cluster.nodes.values():
        assert node.manager.current.partition.strategy == "uniform"
        assert node.manager.record.cluster_seq == 1
    assert cluster.hashes() == {result.cluster_hash}
    again = await gateway.update({"scheduling.policy": "priority"})
    assert again.seq == 2 and cluster.hashes() == {again.cluster_hash}


async def test_one_reject_rolls_back_and_names_the_node(cluster: Cluster) -> None:
    def veto(old: ButterflyConfig, new: ButterflyConfig) -> None:
        if new.partition.strategy == "hybrid":
            raise ValueError("hybrid needs link measurements this node lacks")

    cluster.nodes[2].manager.subscribe("planner", lambda old, new: None, check=veto)
    before = {i: n.manager.record.version for i, n in cluster.nodes.items()}
    with pytest.raises(ConfigRejected, match="node 2 rejected") as info:
        await cluster.nodes[0].coordinator.update({"partition.strategy": "hybrid"})
    assert info.value.node == 2 and "link measurements" in info.value.reason
    assert {i: n.manager.record.version for i, n in cluster.nodes.items()} == before
    assert all(
        n.manager.current.partition.strategy == "load_balanced" for n in cluster.nodes.values()
    )
    assert all(n.driver.last_executed == 0 for n in cluster.nodes.values())  # never ordered


async def test_conflicting_updates_end_in_one_agreed_order(cluster: Cluster) -> None:
    gateway = cluster.nodes[0].coordinator
    outcomes = await asyncio.gather(
        gateway.update({"partition.strategy": "uniform"}),
        gateway.update({"partition.strategy": "hybrid"}),
        return_exceptions=True,
    )
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert isinstance(lost[0], UpdateRefused) and "stale" in str(lost[0])
    assert cluster.hashes() == {won[0].cluster_hash}
    assert {n.manager.history.last_cluster_seq() for n in cluster.nodes.values()} == {1}


async def test_a_node_down_during_an_update_catches_up_when_it_returns(cluster: Cluster) -> None:
    await cluster.stop(3)
    gateway = cluster.nodes[0].coordinator
    first = await gateway.update({"partition.strategy": "uniform"})
    assert first.nodes[3] == "unreachable" and first.nodes[1] == "applied"
    for k in range(5):  # past a PBFT checkpoint: the returning node needs state transfer
        await gateway.update({"byzantine.audit_fraction": 0.5 + k / 100})
    back = await cluster.start(3)
    final = cluster.nodes[0].manager.record.cluster_hash
    await wait_until(lambda: back.manager.record.cluster_hash == final)
    assert back.manager.history.last_cluster_seq() == 6
    assert back.manager.current.byzantine.audit_fraction == 0.54
    result = await gateway.update({"scheduling.policy": "priority"})
    assert result.nodes[3] == "applied"


async def test_a_restarted_node_resumes_without_reapplying(cluster: Cluster) -> None:
    gateway = cluster.nodes[0].coordinator
    await gateway.update({"partition.strategy": "uniform"})
    versions = cluster.nodes[2].manager.history.versions()
    await cluster.stop(2)
    back = await cluster.start(2)  # replays seq 1 from the agreement log: already applied
    await wait_until(lambda: back.driver.applied >= 1)
    assert back.manager.current.partition.strategy == "uniform"
    assert len(back.manager.history.versions()) == len(versions)


async def test_a_node_that_refused_after_commit_is_flagged_and_synced(cluster: Cluster) -> None:
    refused: list[str] = []

    def flaky(old: ButterflyConfig, new: ButterflyConfig) -> None:
        if not refused:
            refused.append(new.partition.strategy)
            raise RuntimeError("could not re-plan in time")

    cluster.nodes[3].manager.subscribe("replanner", flaky)
    gateway = cluster.nodes[0].coordinator
    result = await gateway.update({"partition.strategy": "uniform"})
    assert result.nodes[3].startswith("diverged") and "re-plan" in result.nodes[3]
    await gateway.cluster_status()
    health = gateway.health()
    assert health["diverged"] == [3] and not health["in_sync"] and 3 in health["errors"]
    report = await gateway.sync()
    assert report[3] == "synced" and report[0] == "in sync"
    assert gateway.health()["in_sync"] and cluster.hashes() == {result.cluster_hash}
    assert cluster.nodes[3].manager.history.last_cluster_seq() == 1


async def test_rollback_is_a_new_agreed_version(cluster: Cluster) -> None:
    gateway = cluster.nodes[0].coordinator
    start = cluster.nodes[0].manager.record
    await gateway.update({"partition.strategy": "uniform"})
    result = await gateway.rollback(start.version)
    assert result.seq == 2 and result.cluster_hash == start.cluster_hash
    assert cluster.hashes() == {start.cluster_hash}
    with pytest.raises(UpdateRefused, match="does nothing"):
        await gateway.rollback(start.version)


async def test_static_and_unknown_keys_are_refused_before_any_vote(cluster: Cluster) -> None:
    gateway = cluster.nodes[0].coordinator
    with pytest.raises(UpdateRefused, match=r"restart required: byzantine\.f"):
        await gateway.update({"byzantine.f": 0})
    with pytest.raises(ConfigInvalid, match="did you mean"):
        await gateway.update({"partition.strategey": "uniform"})
    result = await gateway.update({"observability.log_level": "debug"})  # local: gateway only
    assert result.seq == 0 and cluster.nodes[1].manager.current.observability.log_level == "info"
    assert all(n.driver.last_executed == 0 for n in cluster.nodes.values())


async def test_without_a_quorum_an_update_times_out_and_never_splits(cluster: Cluster) -> None:
    cluster.muted.update({2, 3})  # they vote, but their replicas hear nothing: no PBFT quorum
    with pytest.raises(ConfigTimeout, match="could not be ordered either"):
        await cluster.nodes[0].coordinator.update({"partition.strategy": "uniform"})
    assert all(n.manager.history.last_cluster_seq() == 0 for n in cluster.nodes.values())
    cluster.muted.clear()  # the update and its abort are both ordered: one outcome everywhere
    await wait_until(lambda: all(n.driver.applied == 2 for n in cluster.nodes.values()))
    assert len(cluster.hashes()) == 1


def test_a_restart_resumes_agreed_values_but_keeps_local_ones_from_files(tmp_path: Path) -> None:
    history = ConfigHistory(tmp_path / "history.sqlite3")
    manager = ConfigManager(node_config(1), history)
    proposal = propose_update(manager.current, {"partition.strategy": "uniform"})
    manager.apply_committed(proposal, seq=1)
    manager.update({"observability.log_level": "debug"})  # local: the file wins on restart
    resumed = resume_committed(node_config(1), history)
    assert resumed.partition.strategy == "uniform"
    assert resumed.observability.log_level == "info"
    assert resume_committed(node_config(1), ConfigHistory(":memory:")) == node_config(1)


def test_histories_with_unique_sequence_numbers_are_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE versions (version INTEGER PRIMARY KEY, config_hash TEXT NOT NULL,"
            " cluster_hash TEXT NOT NULL, cluster_seq INTEGER UNIQUE, created_at REAL NOT NULL,"
            " source TEXT NOT NULL, reason TEXT NOT NULL, config TEXT NOT NULL)"
        )
    db.close()
    with ConfigHistory(path) as history:
        cfg = node_config(0)
        history.record(cfg, source="t", reason="first", cluster_seq=3)
        history.record(cfg, source="t", reason="sync back", cluster_seq=3)  # no longer refused
        assert history.last_cluster_seq() == 3
        newest = history.by_cluster_seq(3)
        assert newest is not None and newest.reason == "sync back"


async def test_rollback_restores_run_time_settings_and_leaves_static_ones(cluster: Cluster) -> None:
    manager = cluster.nodes[0].manager
    earlier = apply_patch(  # as recorded by an earlier run, before a restart on other limits
        manager.current, {"partition.strategy": "uniform", "network.max_frame_bytes": 2**20}
    )
    record = manager.history.record(earlier, source="earlier run", reason="start")
    result = await cluster.nodes[0].coordinator.rollback(record.version)
    assert [c.key for c in result.changes] == ["partition.strategy"]
    assert {n.manager.current.partition.strategy for n in cluster.nodes.values()} == {"uniform"}
    assert manager.current.network.max_frame_bytes == 256 * 2**20


async def test_a_member_gets_no_vote_and_cannot_order_a_change(cluster: Cluster) -> None:
    """Only the gateway proposes config changes (it checks the API token first): the other
    nodes answer a member's PREPARE with a REJECT, never a signed OK, and even a
    `ConfigUpdate` it built from the gateway's own votes is never ordered."""
    before = cluster.hashes()
    with pytest.raises(ConfigRejected) as info:
        await cluster.nodes[1].coordinator.update({"partition.strategy": "hybrid"})
    assert "gateway" in info.value.reason
    assert cluster.hashes() == before
    # a signed certificate the gateway collected, replayed by a member: refused to order
    body = b"{}"
    digest = hashlib.sha256(body).hexdigest()
    votes = [cluster.nodes[i].replica.vote(digest, body) for i in range(4)]
    update = ConfigUpdate(
        proposal=body, seq=1, nonce=7,
        vote_nodes=tuple(v.node for v in votes), vote_seqs=tuple(v.last_seq for v in votes),
        vote_signatures=tuple(v.signature for v in votes),
    )  # fmt: skip
    with pytest.raises(UnauthorizedCommand):
        await cluster.nodes[2].driver.propose(encode_command(update), timeout=2.0)
    assert all(n.driver.last_executed == 0 for n in cluster.nodes.values())
    assert all(
        n.manager.current.partition.strategy == "load_balanced" for n in cluster.nodes.values()
    )
