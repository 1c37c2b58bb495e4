"""The gateway's table of steps in flight holds the steps in flight and nothing more.

Every table of `dataplane.inflight.InFlight` is keyed by request or (request, step); one
left behind per step grows the acting gateway by an entry per token for as long as it
serves (bench/soak.py found `sent_on` doing so: ~430 entries a minute, never dropped).
"""

from __future__ import annotations

import dataclasses

from butterfly.metrics.events import MetricsEvent
from tests.engine_util import chain, run


async def test_every_in_flight_table_is_empty_after_the_requests_finish() -> None:
    events: list[MetricsEvent] = []
    engine, sent = chain([], events)
    for i in range(5):
        result = await run(engine, tokens=4, task_id=f"r{i}")
        assert list(result.output_ids) == [3, 3, 3, 3]
    assert len(sent) >= 20  # every step of every request went down the chain
    flight = engine._flight
    left = {
        f.name: len(getattr(flight, f.name))
        for f in dataclasses.fields(flight)
        if len(getattr(flight, f.name))
    }
    assert left == {}
