"""Lying stage servers for the data-path simulation, one per strategy, by composition.

Each is the production `StageServer` with one thing changed, as a member holding its own
key could change it: what it sends, what it signs, which records it forwards, what it
answers an audit. Each notes the request in which it lied (`lies`), so the simulation can
measure how many requests pass between a liar's first lie and its eviction.

The strategies:

- honest: a liar that never lies (it must never be evicted, and is never "caught");
- corrupt: changes its output, everywhere (chain steps, lanes, audits), and signs what
  it sends;
- sign-honest-send-corrupt: signs its honest output, sends a corrupted one;
- omit: on every decode step sends a corrupted output and no record of it (a record only
  for the prefill);
- intermittent: corrupts (and signs) about one step in three, chosen by its own seed;
- collude: corrupts exactly as its partner does (one shared column), so when one runs a
  stage and the other is asked to audit it, the auditor confirms the lie;
- auditor: runs every step honestly and lies only in the audits it is asked for.

How records are touched is kept to `own_records_dropped` (the lead adapts it when the
record format changes): everything else is the server's own signing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from butterfly.dataplane.proving import Prover, decode_proofs
from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.testing.sim_stage import InlineTorch
from butterfly.types.ids import NodeId
from butterfly.types.wire.data import AuditReply, AuditRequest, StageStep

STRATEGIES = (
    "honest",
    "corrupt",
    "sign-honest-send-corrupt",
    "omit",
    "intermittent",
    "collude",
    "auditor",
)
LIE_VALUE = 500.5  # far outside what the sim model computes (integers below 97)


@dataclass
class Clock:
    """The request the simulation is running, for the liars to note when they lied."""

    request: int = 0


def corrupted(out: torch.Tensor, column: int) -> torch.Tensor:
    """`out` with one column set to a value no honest stage produces. Idempotent, so a
    server that tampers twice (what it sends, what it signs) signs what it sends."""
    bent = out.clone()
    bent[..., column % out.shape[-1]] = LIE_VALUE
    return bent


def own_records_dropped(proofs: Sequence[bytes], node: NodeId) -> tuple[bytes, ...]:
    """The records of a step without those `node` signed (what an omitting liar forwards)."""
    kept = []
    for raw in proofs:
        mine = [p for p in decode_proofs([raw]) if p.sender == node]
        if not mine:
            kept.append(raw)
    return tuple(kept)


class SimServer(StageServer):
    """The production stage server on the sim model; honest unless a subclass lies."""

    strategy: ClassVar[str] = "honest"
    always_lying: ClassVar[bool] = False

    def __init__(
        self, *, node: NodeId, prover: Prover, clock: Clock, seed: int, keep_outputs: bool = False
    ) -> None:
        super().__init__(
            node=node,
            model_dir=Path("sim-model"),
            max_tensor_bytes=1 << 24,
            torch_thread=InlineTorch(),
            prover=prover,
            keep_outputs=keep_outputs,
        )
        self.clock = clock
        self.rng = random.Random(seed)
        self.column = int(node)  # which output column this liar bends
        self.lies: list[int] = []  # requests in which it lied, in order
        self._lying = self.always_lying

    def lied(self) -> None:
        if not self.lies or self.lies[-1] != self.clock.request:
            self.lies.append(self.clock.request)

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if not self._lying:
            return out
        self.lied()
        return corrupted(out, self.column)


class Corrupt(SimServer):
    strategy = "corrupt"
    always_lying = True


class Collude(Corrupt):
    """Bends the column its partner bends: set `column` to the pair's shared one."""

    strategy = "collude"


class Intermittent(SimServer):
    strategy = "intermittent"

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        self._lying = self.rng.random() < 1 / 3
        try:
            return await super().compute(msg, epoch, payload, route)
        finally:
            self._lying = False


class SignHonestSendCorrupt(SimServer):
    strategy = "sign-honest-send-corrupt"

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        out, proofs = await super().compute(msg, epoch, payload, route)  # honest, honestly signed
        self.lied()
        return encode_tensor(corrupted(decode_tensor(out, 1 << 24), self.column)), proofs


class Omit(SimServer):
    strategy = "omit"

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        self._lying = any(start > 0 for start in msg.starts)  # decode steps
        try:
            out, proofs = await super().compute(msg, epoch, payload, route)
        finally:
            lying, self._lying = self._lying, False
        return (out, own_records_dropped(proofs, self.node)) if lying else (out, proofs)


class AuditorLiar(SimServer):
    strategy = "auditor"

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        self._lying = True
        try:
            return await super().audit(msg, payload)
        finally:
            self._lying = False


SERVERS: dict[str, type[SimServer]] = {
    "honest": SimServer,
    "corrupt": Corrupt,
    "sign-honest-send-corrupt": SignHonestSendCorrupt,
    "omit": Omit,
    "intermittent": Intermittent,
    "collude": Collude,
    "auditor": AuditorLiar,
}
assert tuple(SERVERS) == STRATEGIES
