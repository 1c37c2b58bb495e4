"""Helpers for the protocol tests: fixed keys, signed requests, a perfect in-memory net."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from butterfly.protocol import pbft
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState, Send
from butterfly.protocol.sign import SigningKey, sign_message
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Message, Request

KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(8)]
CLIENT = NodeId(100)
CLIENT_KEY = SigningKey.from_seed(b"c" * 32)


def config(i: int, n: int = 4, f: int = 1, **overrides: object) -> PbftConfig:
    params: dict[str, object] = {
        "replica": NodeId(i),
        "keys": tuple(k.public for k in KEYS[:n]),
        "f": f,
        "clients": {CLIENT: CLIENT_KEY.public},
        "checkpoint_interval": 2,
        "window": 4,
        **overrides,
    }
    return PbftConfig(**params)  # type: ignore[arg-type]


def replicas(n: int = 4, f: int = 1, **overrides: object) -> list[ReplicaState]:
    return [pbft.new_replica(config(i, n, f, **overrides), KEYS[i]) for i in range(n)]


def request(timestamp: int, operation: bytes = b"op") -> Request:
    return sign_message(
        Request(sender=CLIENT, epoch=Epoch(0), timestamp=timestamp, operation=operation),
        CLIENT_KEY,
    )


Drop = Callable[[NodeId, NodeId, Message], bool]


class Net:
    """Delivers every message in send order; `drop` decides which copies are lost."""

    def __init__(self, states: list[ReplicaState], drop: Drop | None = None) -> None:
        self.states = states
        self.now = 0.0
        self.drop: Drop = drop or (lambda src, dst, m: False)
        self.queue: deque[tuple[NodeId, NodeId, Message]] = deque()
        self.to_client: list[Message] = []
        self.steps = 0

    def post(self, src: NodeId, sends: list[Send]) -> None:
        for s in sends:
            targets = (
                [s.to]
                if s.to is not None
                else [NodeId(j) for j in range(len(self.states)) if j != src]
            )
            for dst in targets:
                if dst >= len(self.states):
                    self.to_client.append(s.message)
                elif not self.drop(src, dst, s.message):
                    self.queue.append((src, dst, s.message))

    def feed(self, dst: int, message: pbft.Input) -> None:
        self.states[dst], sends = pbft.step(self.states[dst], message, self.now)
        self.steps += 1
        self.post(NodeId(dst), sends)

    def broadcast_request(self, req: Request) -> None:
        for i in range(len(self.states)):
            if not self.drop(CLIENT, NodeId(i), req):
                self.queue.append((CLIENT, NodeId(i), req))

    def run(self, limit: int = 20000) -> None:
        while self.queue and self.steps < limit:
            _, dst, message = self.queue.popleft()
            if isinstance(message, pbft.Input.__args__):
                self.feed(dst, message)

    def advance(self, seconds: float, *, tick: float = 0.05) -> None:
        """Move the fake clock forward, ticking every replica and delivering in between."""
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + tick, 9)
            for i in range(len(self.states)):
                self.feed(i, pbft.Tick())
            self.run()
