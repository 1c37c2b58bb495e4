"""Long-running loops restarted after an unexpected error instead of taking the node down.

A node runs several loops for its whole life (membership, agreement, evidence, and on
the gateway the batcher, recovery, result expiry and config monitoring). They shared
one task group, so one unexpected exception anywhere (an SQLite "database is locked"
during expiry) cancelled all of them and stopped the node. Each now runs under
`supervised`: the error is logged with its traceback, counted in `/metrics`
(`butterfly_loop_restarts_total{loop}`) and the loop started again after a backoff, so
a loop that keeps failing costs a line per backoff rather than a busy spin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from butterfly.metrics.events import Emit, LoopRestarted

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 10.0
HEALTHY_S = 60.0
"""A loop that ran this long before failing starts its backoff over."""


def restart_delay(
    failures: int, first_s: float = FIRST_DELAY_S, cap_s: float = MAX_DELAY_S
) -> float:
    """Seconds to wait before restart number `failures` (1, 2, ...): doubling, capped."""
    return min(cap_s, first_s * 2.0 ** min(max(0, failures - 1), 60))


async def supervised(
    name: str,
    loop: Callable[[], Awaitable[None]],
    emit: Emit,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run `loop()` until it returns or is cancelled, restarting it after each error.

    Cancellation passes through: stopping the node still stops every loop at once.
    """
    failures = 0
    while True:
        started = clock()
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            failures = 1 if clock() - started >= HEALTHY_S else failures + 1
            delay = restart_delay(failures)
            log.exception("loop %r failed; restarting it in %.1f s", name, delay)
            emit(LoopRestarted(name))
            await sleep(delay)


__all__ = ["restart_delay", "supervised"]
