"""Faulty stage servers: a node composed with one of these lies in a specific way.

They are whole parts, swapped in by composition (`build_node(..., stage_server_type=...)`),
never switches inside the production types. Each signs what it sends, as a real liar
holding its own key would: the audit must catch the lie from the content alone.
"""

from __future__ import annotations

import asyncio

import torch

from butterfly.dataplane.stage_server import StageServer
from butterfly.net.framing import Envelope
from butterfly.types.wire.control import PlanAck, PlanAssign
from butterfly.types.wire.data import AuditReply, AuditRequest


class CorruptStageServer(StageServer):
    """Perturbs every activation it sends."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.node))
        return out + 0.5 * torch.randn(out.shape, generator=g, dtype=out.dtype)


class WrongLayerStageServer(StageServer):
    """Skips the last layer of its stage: with that block's output projections zeroed the
    block adds nothing to the residual stream, exactly as if it were not run."""

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        ack = await super().apply_plan(msg)
        blocks = getattr(self.stage, "blocks", None)
        if blocks:
            for name in ("wo", "w2"):
                weight = getattr(blocks[-1], name, None)
                if isinstance(weight, torch.Tensor):
                    weight.zero_()
        return ack


class SlowStageServer(StageServer):
    """Correct, but `delay_s` late on every step and audit: later than a test's
    `network.step_timeout_ms`, so every answer arrives after the gateway gave up."""

    delay_s = 5.0

    async def compute(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay_s)
        return await super().compute(*args, **kwargs)

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        await asyncio.sleep(self.delay_s)
        return await super().audit(msg, payload)


class SilentStageServer(StageServer):
    """Heartbeats (the node's membership runs) but never answers a step or an audit; its
    votes are silenced by `butterfly.testing.liar_votes.SilentDriver`."""

    async def on_step(self, env: Envelope):  # type: ignore[no-untyped-def]
        await asyncio.Event().wait()

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


BEHAVIOURS: dict[str, type[StageServer]] = {
    "honest": StageServer,
    "corrupt": CorruptStageServer,
    "wrong-layer": WrongLayerStageServer,
    "slow": SlowStageServer,
    "silent": SilentStageServer,
    "equivocate": StageServer,  # an honest data path; its votes lie (testing.liar_votes)
}
