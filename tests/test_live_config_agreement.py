"""The agreement layer's timers follow a config change at once, on running replicas.

Real PBFT drivers, config replicas and coordinators over the in-memory transport, each
subscribed to its node's `ConfigManager` as the node subscribes them
(`control.live_config.follow_agreement_config`). The timers start at 600 s, so a test
that finishes shows the new value was used: with the old one it would wait ten minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from butterfly.agreement.config_coordinator import ConfigCoordinator, ConfigTimeout
from butterfly.agreement.config_replica import ConfigReplica
from butterfly.agreement.driver import AgreementDriver
from butterfly.config import load_config
from butterfly.config.reload import ConfigManager
from butterfly.control.live_config import follow_agreement_config
from butterfly.control.recovery import Recovery
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol.keys import veto_grace
from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import ConsensusTimeout
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import AgreementFrame
from butterfly.types.wire.frames import Message
from tests.test_live_config import change, recovery_parts

pytestmark = pytest.mark.timeout(60)
KEYS = [SigningKey.from_seed(bytes([i + 70]) * 32) for i in range(4)]
SLOW = {
    "coordination.view_change_timeout_ms": 600_000,
    "coordination.phase_timeout_ms": 600_000,
    "coordination.config_update_timeout_ms": 600_000,
}


@dataclass
class Nodes:
    net: MemoryNetwork
    managers: dict[int, ConfigManager] = field(default_factory=dict)
    drivers: dict[int, AgreementDriver] = field(default_factory=dict)
    coordinators: dict[int, ConfigCoordinator] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def start(nodes: Nodes, i: int, n: int, tmp_path: Path, *, ordering: bool = True) -> None:
    """Node i of n; `ordering=False`: its config changes are never ordered (no quorum)."""
    manager = ConfigManager(load_config(overrides=SLOW))
    c = manager.current.coordination
    keys = tuple(k.public for k in KEYS[:n])
    f = (n - 1) // 3
    transport = nodes.net.transport(NodeId(i), lambda e: None)
    driver = AgreementDriver(
        config=PbftConfig(  # as protocol.keys.pbft_config builds it
            replica=NodeId(i),
            keys=keys,
            f=f,
            clients={NodeId(j): k for j, k in enumerate(keys)},
            request_timeout=c.view_change_timeout_ms / 1000,
            view_change_timeout=c.phase_timeout_ms / 1000,
            retransmit_interval=0.05,
        ),
        key=KEYS[i],
        transport=transport,
        on_commit=lambda seq, data: asyncio.sleep(0),
    )
    replica = ConfigReplica(
        node=NodeId(i), manager=manager, key=KEYS[i], keys=keys, f=f, transport=transport
    )

    async def propose(command: bytes, timeout: float) -> int:
        if not ordering:
            await asyncio.sleep(timeout)
            raise ConsensusTimeout(f"not ordered within {timeout:.1f} s")
        return await driver.propose(command, timeout=timeout)

    coordinator = ConfigCoordinator(
        replica=replica,
        transport=transport,
        propose=propose,
        members=tuple(NodeId(j) for j in range(n)),
        f=f,
        live=lambda node: True,
        timeout_s=c.config_update_timeout_ms / 1000,
    )
    recovery = Recovery(**recovery_parts([NodeId(j) for j in range(n)], None, []))
    follow_agreement_config(manager, driver=driver, coordinator=coordinator, recovery=recovery)

    async def handle(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
        if isinstance(env.msg, AgreementFrame):
            await driver.on_frame(env)
            return None
        return await replica.on_message(peer, env)

    await transport.start(handle)
    nodes.managers[i], nodes.drivers[i], nodes.coordinators[i] = manager, driver, coordinator
    nodes.tasks.append(asyncio.create_task(driver.run()))


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    found = Nodes(MemoryNetwork())
    try:
        yield found
    finally:
        for task in found.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for manager in found.managers.values():
            manager.history.close()


async def test_shorter_pbft_timers_replace_a_silent_primary_now(
    nodes: Nodes, tmp_path: Path
) -> None:
    for i in range(4):
        await start(nodes, i, 4, tmp_path)
    nodes.net.down.add(NodeId(0))  # the primary of view 0
    ordered = asyncio.create_task(nodes.drivers[1].propose(b"cmd", timeout=600.0))
    await asyncio.sleep(0.3)
    assert not ordered.done()  # the backups' request timers say 600 s
    for i in range(4):  # as every node does at the agreed sequence number
        change(
            nodes.managers[i],
            {"coordination.view_change_timeout_ms": 300, "coordination.phase_timeout_ms": 300},
        )
    async with asyncio.timeout(30):
        seq = await ordered
    assert seq == 1 and nodes.drivers[1].view >= 1  # a view change replaced node 0


async def test_a_shorter_config_update_timeout_applies_to_the_next_update(
    nodes: Nodes, tmp_path: Path
) -> None:
    await start(nodes, 0, 1, tmp_path, ordering=False)
    change(nodes.managers[0], {"coordination.config_update_timeout_ms": 200})
    async with asyncio.timeout(30):
        with pytest.raises(ConfigTimeout, match=r"0\.2 s"):
            await nodes.coordinators[0].update({"partition.strategy": "uniform"})
    assert nodes.managers[0].current.partition.strategy == "load_balanced"


async def test_the_veto_grace_follows_the_failure_detector_settings(
    nodes: Nodes, tmp_path: Path
) -> None:
    """A slower detector (phi 12 -> 40, min std 50 -> 400 ms) declares failures further
    apart: the replica waits longer before vetoing a takeover (`protocol.keys.veto_grace`)."""
    await start(nodes, 0, 4, tmp_path)
    change(nodes.managers[0], {"coordination.phi_failed": 40.0, "coordination.min_std_ms": 400.0})
    grace = nodes.drivers[0].state.config.veto_grace
    assert grace == veto_grace(nodes.managers[0].current) and grace > 2.0
