"""The seed 000 quick-start examples run and print what the seed shows."""

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
        ("failure_detection.py", ["Heartbeat 19: φ =", "Node 1 SUSPECTED", "Node 1 FAILED"]),
        (
            "byzantine_agreement.py",
            [
                "f=2 needs 7",
                "Node 2 voted, quorum reached: true",
                "Node 1 committed, finalized: false",
                "Node 2 committed, finalized: true",
                "Result committed: AgreementValue(epoch=0, data=(1, 2, 3, 4, 5))",
            ],
        ),
        (
            "checkpoint_recovery.py",
            [
                "Checkpoint created at token position 20",
                "Recovered from checkpoint at position 20 (epoch 4)",
                "Recomputing: 20 -> 23",
                "Total created: 5",
            ],
        ),
    ],
)
def test_example_prints_the_seed_shape(name: str, expected: list[str]) -> None:
    output = run(name)
    for line in expected:
        assert line in output
