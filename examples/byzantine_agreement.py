"""Seed 000's "Byzantine Agreement" example: PRE-PREPARE, PREPARE and COMMIT by 5 nodes.

Five `AgreementDriver`s, the PBFT replica each node runs, over the in-memory transport
(the same frame codec as TCP), each signing with its own key. Node 0 proposes a command
and every vote printed is a real signed PBFT message as it reaches node 0 (the primary),
with node 0's replica state after it: prepared once it holds q - 1 matching PREPAREs from
backups, decided once it holds q matching COMMITs (its own included), where the quorum
q = ceil((n + f + 1) / 2) is the smallest size any two of which share f + 1 nodes.

Where it departs from the seed:
- The seed runs 5 nodes with f = 2. Under PBFT that is unsafe: n >= 3f + 1 is needed so
  that any two quorums of 2f + 1 share an honest node, and 5 nodes only tolerate f = 1.
  Butterfly refuses f = 2 with the rule and the largest safe f, and runs f = 1. Its quorum
  is 4 of 5, not 2f + 1 = 3: two sets of 3 of 5 can meet in one node, the liar.
- The seed agrees on an inference result. A Butterfly cluster agrees on the commands that
  change shared state (agreement.commands: the stage plan of an epoch, an eviction, a
  config update); inference results are checked by the gateway (audit or replicate), not
  voted on. Node 0 proposes the stage plan of epoch 1 here.
- A primary sends no PREPARE of its own (its PRE-PREPARE stands for it), so the PREPARE
  phase shows the four backups.

    .venv/bin/python examples/byzantine_agreement.py
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

from butterfly.agreement.driver import AgreementDriver
from butterfly.metrics.events import discard
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol.pbft_state import PbftConfig, prepared_digest
from butterfly.protocol.quorum import quorum
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import InsufficientNodes
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import Commit, Message, Prepare, decode
from butterfly.types.wire.commands import NewPlan, decode_command, encode_command
from butterfly.types.wire.control import AgreementFrame

N, F = 5, 1
KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(N)]
PUBLIC = tuple(k.public for k in KEYS)


def pbft_config(node: int, f: int = F) -> PbftConfig:
    """As `protocol.keys.pbft_config` builds it from a node's config, in view 0 so that
    node 0, the proposer, is also the primary (as in the seed)."""
    return PbftConfig(
        replica=NodeId(node),
        keys=PUBLIC,
        f=f,
        clients={NodeId(i): k for i, k in enumerate(PUBLIC)},
    )


class Observer:
    """What node 0's replica says after each vote it receives."""

    def __init__(self, primary: AgreementDriver) -> None:
        self.primary = primary
        self.prepares: list[str] = []
        self.commits: list[str] = []
        self._own_commit = False
        self._seen: set[tuple[str, int]] = set()  # PBFT retransmits; print each vote once

    def prepared(self) -> bool:
        state = self.primary.state
        slot = state.log.get(1)
        pp = slot.pre_prepares.get(state.view) if slot else None
        return (
            slot is not None
            and pp is not None
            and prepared_digest(state, slot, state.view) == pp.digest
        )

    def finalized(self) -> bool:
        return self.primary.last_executed >= 1

    def saw(self, message: Message) -> None:
        if isinstance(message, Prepare | Commit):
            vote = (message.kind, int(message.sender))
            if vote in self._seen:
                return
            self._seen.add(vote)
        if isinstance(message, Prepare):
            prepared = self.prepared()
            self.prepares.append(
                f"  Node {message.sender} voted, quorum reached: {str(prepared).lower()}"
            )
        if not self._own_commit and self.prepared():  # the replica sent its own COMMIT
            self._own_commit = True
            self.commits.append(f"  Node 0 committed, finalized: {str(self.finalized()).lower()}")
        if isinstance(message, Commit):
            done = str(self.finalized()).lower()
            self.commits.append(f"  Node {message.sender} committed, finalized: {done}")


async def run() -> None:
    net = MemoryNetwork()
    logs: dict[int, list[str]] = {}
    drivers: list[AgreementDriver] = []
    for i in range(N):
        log = logs[i] = []

        async def on_commit(seq: int, command: bytes, log: list[str] = log) -> None:
            log.append(repr(decode_command(command)))

        drivers.append(
            AgreementDriver(
                config=pbft_config(i),
                key=KEYS[i],
                transport=net.transport(NodeId(i), discard),
                on_commit=on_commit,
            )
        )
    observer = Observer(drivers[0])

    for i, driver in enumerate(drivers):

        async def handle(
            peer: NodeId, env: Envelope, driver: AgreementDriver = driver, me: int = i
        ) -> tuple[Message, bytes] | None:
            if isinstance(env.msg, AgreementFrame):
                await driver.on_frame(env)
                if me == 0:
                    observer.saw(decode(env.payload))
            return None

        await net.nodes[NodeId(i)].start(handle)

    plan = NewPlan(epoch=1, stages=(0, 0, 3, 1, 3, 6, 2, 6, 9, 3, 9, 12))  # (node, start, end)
    command = encode_command(plan)
    tasks = [asyncio.create_task(d.run()) for d in drivers]
    try:
        head = ", ".join(str(b) for b in hashlib.sha256(command).digest()[:3])
        print(f"PRE-PREPARE: Node 0 proposes {plan.kind} with hash [{head}, ...]")
        await drivers[0].propose(command, timeout=10.0)
        async with asyncio.timeout(10.0):
            while not all(logs[i] for i in range(N)):
                await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in list(net.nodes.values()):
            await transport.close()

    print("\nPREPARE phase:")
    print("\n".join(observer.prepares))
    print("\nCOMMIT phase:")
    print("\n".join(observer.commits))
    agreed = {tuple(log) for log in logs.values()}
    print(f"\nResult committed on all {N} nodes: {logs[0][0]}" if len(agreed) == 1 else agreed)


def main() -> None:
    try:
        pbft_config(0, f=2)
    except InsufficientNodes as refused:
        print(f"f=2 refused: {refused}")
    print(f"Running with f={F} instead: quorum ceil((n+f+1)/2) = {quorum(N, F)} of {N}\n")
    asyncio.run(run())


if __name__ == "__main__":
    main()
