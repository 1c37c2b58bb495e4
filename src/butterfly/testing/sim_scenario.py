"""The schedules the PBFT simulation runs: everything a seed decides, in one value.

A `Scenario` fixes the cluster (n, f), who lies and how, the clients' load and how hostile
the network is until it heals; `scenario_for(seed)` derives one from a seed, so a failing
schedule is named, and replayed, by its seed alone.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass

from butterfly.protocol.quorum import max_faulty
from butterfly.protocol.sign import SigningKey
from butterfly.testing.sim_byzantine import Behaviour
from butterfly.types.ids import NodeId


@dataclass(frozen=True)
class Scenario:
    seed: int
    n: int
    f: int
    liars: tuple[tuple[NodeId, Behaviour], ...]
    clients: int
    requests_per_client: int
    drop: float
    duplicate: float
    max_delay: float
    partition: frozenset[NodeId] | None  # one side of a cut that lasts until heal_at
    heal_at: float
    deadline: float
    checkpoint_interval: int
    window: int

    @property
    def beyond_f(self) -> bool:
        return len(self.liars) > self.f

    def describe(self) -> str:
        liars = ", ".join(f"{n}:{b}" for n, b in self.liars) or "none"
        cut = sorted(self.partition) if self.partition else None
        return (
            f"n={self.n} f={self.f} liars=[{liars}] clients={self.clients}x"
            f"{self.requests_per_client} drop={self.drop:.2f} dup={self.duplicate:.2f} "
            f"delay<={self.max_delay * 1000:.0f}ms cut={cut} heal_at={self.heal_at:.2f}s "
            f"K={self.checkpoint_interval} window={self.window}"
        )


def scenario_for(seed: int, *, extra_liars: int = 0) -> Scenario:
    """The schedule a seed stands for; `extra_liars` > 0 goes beyond what PBFT tolerates."""
    rng = random.Random(seed)
    n = 7 if rng.random() < 0.15 else 4
    f = max_faulty(n)
    count = min(n, rng.randint(0, f) + extra_liars)
    chosen = rng.sample(range(n), count)
    colluding = extra_liars > 0 and rng.random() < 0.5  # beyond f, often a planned fork
    if chosen and 0 not in chosen and (colluding or rng.random() < 0.5):
        chosen[0] = 0  # a lying first primary exercises view changes and equivocation
    liars = tuple(
        sorted(
            (NodeId(i), Behaviour.FORK if colluding else rng.choice(list(Behaviour)))
            for i in chosen
        )
    )
    heal_at = rng.uniform(0.2, 1.0)
    interval = rng.choice((2, 3, 4))
    return Scenario(
        seed=seed,
        n=n,
        f=f,
        liars=liars,
        clients=rng.randint(2 if colluding else 1, 3),
        requests_per_client=rng.randint(1, 3),
        drop=rng.choice((0.0, 0.05, 0.2)),
        duplicate=rng.choice((0.0, 0.05, 0.2)),
        max_delay=rng.choice((0.005, 0.03)),
        partition=frozenset(map(NodeId, rng.sample(range(n), n // 2)))
        if rng.random() < 0.4
        else None,
        heal_at=heal_at,
        deadline=heal_at + (4.0 if extra_liars else 20.0),
        checkpoint_interval=interval,
        window=interval * rng.choice((2, 3)),
    )


@functools.lru_cache(maxsize=64)
def sim_key(label: str) -> SigningKey:
    """Fixed keys per role: generating keys per schedule would only cost time."""
    return SigningKey.from_seed(hashlib.sha256(label.encode()).digest())
