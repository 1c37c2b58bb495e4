"""`butterfly generate`: the README's one-process command, split into K stages, gives the
unsplit model's tokens at every K (README, "Command line" and "Set-up")."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from butterfly.cli import app


def generated(model: Path, stages: int) -> list[int]:
    args = ["generate", "--model", str(model), "Butterfly splits", "--max-tokens", "8"]
    result = CliRunner().invoke(app, [*args, "--stages", str(stages), "--json"])
    assert result.exit_code == 0, result.output
    ids = json.loads(result.stdout)["output_ids"]
    assert isinstance(ids, list) and len(ids) == 8
    return [int(i) for i in ids]


def test_every_stage_count_generates_the_unsplit_models_tokens(tiny_model: Path) -> None:
    whole = generated(tiny_model, 1)
    assert generated(tiny_model, 2) == whole
    assert generated(tiny_model, 4) == whole
