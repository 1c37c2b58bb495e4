"""Hundreds of seeded PBFT schedules with liars and a hostile network (`butterfly.testing.sim`);
`BUTTERFLY_SIM_SCHEDULES=10000` runs thousands.

`BUTTERFLY_SIM_SCHEDULES` sets how many schedules the big run covers (default sized for
this 2-core machine); `BUTTERFLY_SIM_START` shifts the seeds, so a nightly job can cover
new ground. A failure names its seed and how to replay it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest

from butterfly.testing.sim import (
    ScheduleFailure,
    Simulation,
    run_schedule,
    scenario_for,
)
from butterfly.testing.sim_byzantine import Behaviour

SCHEDULES = int(os.environ.get("BUTTERFLY_SIM_SCHEDULES", "500"))  # 1000 until 2026-12-07: 16 s
BEYOND_F = int(os.environ.get("BUTTERFLY_SIM_BEYOND_F", "60"))
START = int(os.environ.get("BUTTERFLY_SIM_START", "0"))


@pytest.mark.slow
def test_seeded_schedules_keep_safety_validity_progress_and_convict_equivocators() -> None:
    kinds: Counter[str] = Counter()
    for seed in range(START, START + SCHEDULES):
        result = run_schedule(seed)  # raises ScheduleFailure naming the seed
        assert result.progressed
        kinds.update(str(b) for _, b in result.scenario.liars)
        kinds["view changes"] += result.max_view > 0
        kinds["evidence"] += result.evidence > 0
    if SCHEDULES >= 200:  # the mix really exercised every behaviour
        assert all(kinds[str(b)] > 10 for b in Behaviour)
        assert kinds["view changes"] > SCHEDULES // 10 and kinds["evidence"] > SCHEDULES // 20


def test_more_than_f_liars_stall_or_get_reported_never_fork_silently() -> None:
    outcomes: Counter[str] = Counter()
    for seed in range(START, START + BEYOND_F):
        result = run_schedule(seed, extra_liars=1)  # raises on a silent fork
        if result.forks:
            assert result.detected
            outcomes["fork, reported"] += 1
        else:
            outcomes["safe" if result.progressed else "stalled"] += 1
    if BEYOND_F >= 60:
        assert outcomes["fork, reported"] > 0  # the colluding liars did split the log


def test_a_schedule_replays_identically_from_its_seed() -> None:
    first, second = run_schedule(17), run_schedule(17)
    assert (first.events, first.sim_time, first.evidence) == (
        second.events,
        second.sim_time,
        second.evidence,
    )


def test_a_failure_names_its_seed_and_how_to_replay_it() -> None:
    scenario = dataclasses.replace(scenario_for(5), deadline=0.01)  # no time to finish
    with pytest.raises(ScheduleFailure) as info:
        Simulation(scenario).run()
    message = str(info.value)
    assert "seed=5" in message and "replay(5)" in message and "no progress" in message
