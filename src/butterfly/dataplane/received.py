"""The inputs a stage node received for the steps it signed, kept for a while after.

A signed record pins a stage's largest outputs only (`protocol.proof.fingerprint`), so a
stage can change the rest of what it sends, sign exactly that, and pass its own audit;
the next stage computes honestly on it and contradicts the audit's re-execution on the
honest input. To tell that honest receiver from a liar, the gateway asks it for what it
received (`InputsQuery`): those bytes hash to the sender's signed output, so if they are
not the honest computation, the sender signed a lie (`audit.Auditor`). A receiver that
no longer holds them cannot clear itself: the bound is generous, and an audit follows
its request within seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from butterfly.types.ids import RequestId

KEEP_BYTES = 64 << 20
"""Inputs kept per node: about 20,000 positions of a 768-wide float32 model, many
times what the audits under way need (each follows its request within seconds)."""
KEEP_S = 600.0
"""How long a request's inputs are kept after its last step."""
ATTEMPTS = 2
"""Distinct inputs kept per step: a step sent again may have come otherwise (relayed
through the gateway after a refusal); the audit takes the one its record hashes."""


@dataclass
class _Request:
    steps: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    nbytes: int = 0
    last: float = 0.0


class Received:
    """Per request, per (epoch, step), the input rows this node computed on; whole
    requests leave first-in first-out past `limit` bytes or `keep_s` seconds."""

    def __init__(
        self,
        limit: int = KEEP_BYTES,
        keep_s: float = KEEP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit, self._keep_s, self._clock = limit, keep_s, clock
        self._held: OrderedDict[RequestId, _Request] = OrderedDict()
        self.nbytes = 0

    def keep(self, request_id: RequestId, epoch: int, step: int, rows: torch.Tensor) -> None:
        """`rows` as received (a copy is kept: the frame's buffer is not ours to hold)."""
        now = self._clock()
        held = self._held.pop(request_id, None) or _Request()
        self._held[request_id] = held  # the most recent last
        held.last = now
        attempts = held.steps.setdefault((epoch, step), [])
        if any(a.dtype == rows.dtype and torch.equal(a, rows) for a in attempts):
            return
        size = rows.numel() * rows.element_size()
        attempts.append(rows.detach().clone())
        held.nbytes += size
        self.nbytes += size
        if len(attempts) > ATTEMPTS:
            dropped = attempts.pop(0)
            held.nbytes -= dropped.numel() * dropped.element_size()
            self.nbytes -= dropped.numel() * dropped.element_size()
        self._trim(now)

    def held(
        self, request_id: RequestId, epoch: int, steps: tuple[int, ...]
    ) -> list[tuple[int, torch.Tensor]]:
        """(step, rows) of every kept input of these steps, in the order asked."""
        self._trim(self._clock())
        held = self._held.get(request_id)
        if held is None:
            return []
        return [(s, rows) for s in steps for rows in held.steps.get((epoch, s), [])]

    def _trim(self, now: float) -> None:
        while self._held:
            request_id, oldest = next(iter(self._held.items()))
            if self.nbytes <= self._limit and now - oldest.last <= self._keep_s:
                return
            del self._held[request_id]
            self.nbytes -= oldest.nbytes
