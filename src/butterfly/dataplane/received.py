"""The rows a stage node received and sent for the steps it signed, kept until the
request is released.

A signed record pins a stage's largest outputs only (`protocol.proof.fingerprint`), so a
stage can change the rest of what it sends, sign exactly that, and pass its own audit;
the next stage computes honestly on it and contradicts the audit's re-execution on the
honest input. To tell that honest receiver from a liar, the gateway asks for the bytes
that crossed between them (`InputsQuery`): from the receiver, or else from the sender
(of the two, with at most f liars, one is honest and has them). Those bytes hash to the
sender's signed output, and the receiver is judged on them (`audit.Auditor`).

Kept as long as the request's KV caches are (the gateway releases a request after its
audit): at most `max_requests` requests (resources.max_kv_caches), each for
`keep_s` after its last step (resources.kv_cache_ttl_s), the least recent leaving first.
A stage's input rows are a fraction of its KV cache's bytes (one row of the hidden width
per position, against two per layer), so the bound is the caches' own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from butterfly.types.ids import RequestId

ATTEMPTS = 2
"""Distinct rows kept per step: a step sent again may have come otherwise (relayed
through the gateway after a refusal); the audit takes the one its record hashes."""


@dataclass
class _Request:
    # (epoch, step, sent) -> the rows, as received (sent False) or as sent (True)
    steps: dict[tuple[int, int, bool], list[torch.Tensor]] = field(default_factory=dict)
    last: float = 0.0


class Received:
    def __init__(
        self, max_requests: int, keep_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max, self._keep_s, self._clock = max_requests, keep_s, clock
        self._held: OrderedDict[RequestId, _Request] = OrderedDict()

    def keep(
        self, request_id: RequestId, epoch: int, step: int, rows: torch.Tensor, *, sent: bool
    ) -> None:
        """`rows` as received or sent (a copy: a frame's buffer is not ours to hold)."""
        now = self._clock()
        held = self._held.pop(request_id, None) or _Request()
        self._held[request_id] = held  # the most recent last
        held.last = now
        attempts = held.steps.setdefault((epoch, step, sent), [])
        if not any(a.dtype == rows.dtype and torch.equal(a, rows) for a in attempts):
            attempts.append(rows.detach().clone())
            del attempts[:-ATTEMPTS]
        self._trim(now)

    def held(
        self, request_id: RequestId, epoch: int, steps: tuple[int, ...], *, sent: bool
    ) -> list[tuple[int, torch.Tensor]]:
        """(step, rows) of every kept attempt of these steps, in the order asked."""
        self._trim(self._clock())
        held = self._held.get(request_id)
        if held is None:
            return []
        return [(s, rows) for s in steps for rows in held.steps.get((epoch, s, sent), [])]

    def expire(self) -> None:
        """Drop the requests idle past `keep_s`."""
        self._trim(self._clock())

    def release(self, request_id: RequestId) -> None:
        self._held.pop(request_id, None)

    @property
    def requests(self) -> int:
        return len(self._held)

    def _trim(self, now: float) -> None:
        while self._held:
            request_id, oldest = next(iter(self._held.items()))
            if len(self._held) <= self._max and now - oldest.last <= self._keep_s:
                return
            del self._held[request_id]
