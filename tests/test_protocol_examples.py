"""The seed 000 quick-start examples drive the parts a node runs and print the seed's shape.

Each example says in its docstring where its output departs from the seed's, and why."""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "failure_detection.py",
            [
                "Heartbeat 19: φ = 0.02",
                "Node 1 SUSPECTED (φ = 10.11)",
                "Node 1 FAILED (φ = 16.65)",
                "Status after 1 s of silence: failed",
                "crossed 461 ms and 532 ms after the last heartbeat",
                "Node 1 healthy again",
            ],
        ),
        (
            "work_assignment.py",
            [
                "RoundRobin -> uniform Strategy:",
                "  Node NodeId(0): 5 layers [0, 5), 27.00ms",
                "  Node NodeId(3): 3 layers [17, 20), 63.00ms",
                "  Load imbalance: 11.2%",
                "Slowest stage 70.10ms, 3 activation transfers per token, 2.20ms on the links",
            ],
        ),
        (
            "checkpoint_recovery.py",
            [
                "Checkpoint created at token position 5\n",
                "Checkpoint created at token position 20\n",
                "Recovered from checkpoint at position 20 (epoch 2)",
                "Recomputing: 20 -> 23",
                "the same as without the failure: true",
                "Total created: 4",
            ],
        ),
    ],
)
def test_example_prints_the_seed_shape(name: str, expected: list[str]) -> None:
    output = run(name)
    for line in expected:
        assert line in output


def test_agreement_example_runs_pbft_among_five_drivers() -> None:
    """The votes reach the primary in an order the scheduler picks; the quorum rules do
    not depend on it: with n = 5, f = 1 the quorum is 4, so two backup PREPAREs do not
    prepare (3 are needed), the third does; three COMMITs do not decide, a fourth does."""
    output = run("byzantine_agreement.py")
    assert "f=2 needs 7" in output
    prepares = [line for line in output.splitlines() if " voted, quorum reached: " in line]
    assert len(prepares) == 4  # every backup once; the primary's PRE-PREPARE stands for it
    assert [line.endswith("true") for line in prepares] == [False, False, True, True]
    commits = [line for line in output.splitlines() if " committed, finalized: " in line]
    assert len(commits) == 5
    assert [line.endswith("true") for line in commits] == [False, False, False, True, True]
    assert "Result committed on all 5 nodes: NewPlan(epoch=1, " in output
