"""The live driver across a membership change (`agreement.driver`, `protocol.pbft_members`):
5 nodes on the in-memory transport, f = 1, node 4 removed by an agreed command.

A command ordered in the old epoch after the change (decided, never executed: execution
holds at the change) is dropped by every replica with the old epoch, and its proposer's
driver proposes it again in the new one: it runs exactly once everywhere, after the
change, and `propose` returns its new sequence number.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from butterfly.agreement.driver import AgreementDriver
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol.pbft_members import epoch_of
from butterfly.protocol.pbft_state import PbftConfig, entry_at
from butterfly.protocol.sign import SigningKey
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import Request
from butterfly.types.wire.control import AgreementFrame
from butterfly.types.wire.frames import Message

pytestmark = pytest.mark.timeout(60)
KEYS = [SigningKey.from_seed(bytes([i + 40]) * 32) for i in range(5)]
FIVE = tuple(k.public for k in KEYS)
FOUR = (*FIVE[:4], b"")  # node 4 removed


def is_change(request: Request) -> bool:
    return request.operation.startswith(b"members")


async def test_a_command_the_old_epoch_left_unexecuted_runs_once_in_the_new_one() -> None:
    net = MemoryNetwork()
    gate = asyncio.Event()  # holds every node inside the change until the test opens it
    logs: dict[int, list[tuple[int, bytes]]] = {i: [] for i in range(5)}
    rosters = dict.fromkeys(range(5), FIVE)
    drivers: dict[int, AgreementDriver] = {}
    for i in range(5):

        async def on_commit(seq: int, command: bytes, i: int = i) -> None:
            logs[i].append((seq, command))
            if command.startswith(b"members"):
                rosters[i] = FOUR
                await gate.wait()

        transport = net.transport(NodeId(i), lambda event: None)
        driver = AgreementDriver(
            config=PbftConfig(
                replica=NodeId(i),
                keys=FIVE,
                f=1,
                clients={NodeId(j): k for j, k in enumerate(FIVE)},
                epoch=epoch_of(FIVE),
                checkpoint_interval=4,
                window=8,
                retransmit_interval=0.05,
                idle_status_interval=0.2,
                barrier=is_change,
            ),
            key=KEYS[i],
            transport=transport,
            on_commit=on_commit,
            replica_keys=lambda i=i: rosters[i],  # type: ignore[misc]
        )

        async def handle(
            peer: NodeId, env: Envelope, driver: AgreementDriver = driver
        ) -> tuple[Message, bytes] | None:
            if isinstance(env.msg, AgreementFrame):
                await driver.on_frame(env)
            return None

        await transport.start(handle)
        drivers[i] = driver
    tasks = [asyncio.create_task(d.run()) for d in drivers.values()]
    try:
        change = asyncio.create_task(drivers[0].propose(b"members: remove 4", timeout=20))
        async with asyncio.timeout(20):
            while not all(d.state.held for d in drivers.values()):
                await asyncio.sleep(0.01)
        s = drivers[0].state.held
        other = asyncio.create_task(drivers[1].propose(b"other", timeout=20))
        async with asyncio.timeout(20):  # ordered and decided in the old epoch, not run
            while not all(
                (slot := d.state.log.get(s + 1)) is not None and slot.decided is not None
                for d in drivers.values()
            ):
                await asyncio.sleep(0.01)
        assert all(b"other" not in [c for _, c in logs[i]] for i in range(5))
        gate.set()
        assert await change == s
        seq = await other
        assert seq > s
        for i in range(4):
            async with asyncio.timeout(20):
                while (seq, b"other") not in logs[i]:
                    await asyncio.sleep(0.01)
            assert [c for _, c in logs[i]].count(b"other") == 1
            request = entry_at(drivers[i].state, seq).request
            assert request is not None and request.epoch == epoch_of(FOUR)  # signed anew
            config = drivers[i].state.config
            assert (config.epoch, config.members) == (epoch_of(FOUR), (0, 1, 2, 3))
        assert b"other" not in [c for _, c in logs[4]]  # the removed node runs nothing more
        assert drivers[0].peers == (1, 2, 3)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
