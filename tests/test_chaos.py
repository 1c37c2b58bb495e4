"""The chaos suite's CI form: 8 seeded trials, one per fault kind and then some.

Each trial is a fresh 4-node cluster (f = 1) with requests in flight when one fault
strikes; `butterfly.testing.chaos` says which faults and what is checked. The long form
is `bench/chaos.py` (50+ trials, recovery-time distribution).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from butterfly.testing.chaos import FAULTS, run_trial
from tests.cluster_util import reference_tokens

pytestmark = [pytest.mark.cluster, pytest.mark.chaos, pytest.mark.timeout(400)]
SEEDS = range(8)  # seed % len(FAULTS) picks the fault: every kind at least once


def test_the_seeds_cover_every_fault_kind() -> None:
    assert {FAULTS[s % len(FAULTS)] for s in SEEDS} == set(FAULTS)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_fault_loses_no_task_and_changes_no_token(
    seed: int, tiny_model: Path, tmp_path: Path
) -> None:
    @cache
    def reference(prompt: str, new: int) -> list[int]:
        return reference_tokens(tiny_model, prompt, new)

    outcome = run_trial(seed, tiny_model, tmp_path, reference, new_tokens=32)
    assert outcome.tasks == 3
    assert outcome.ok, outcome
    assert outcome.recovery_s is not None
