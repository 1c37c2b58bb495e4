"""Entry points that turn a model directory into stages and layer costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from butterfly.runtime.families import family_for
from butterfly.runtime.progress import bars, quiet
from butterfly.runtime.stage import Family, Stage
from butterfly.runtime.weights import CheckpointReader, read_config
from butterfly.types.model import LayerInfo, LayerRange


def model_args(model_dir: Path) -> tuple[Family, Any]:
    config = read_config(model_dir)
    family = family_for(config)
    return family, family.parse(config)


def num_layers(model_dir: Path) -> int:
    family, args = model_args(model_dir)
    return family.num_layers(args)


def layer_infos(model_dir: Path) -> list[LayerInfo]:
    family, args = model_args(model_dir)
    return family.layer_infos(args)


def load_stage(
    model_dir: Path,
    layers: LayerRange | None = None,
    *,
    reader: CheckpointReader | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Stage:
    """Load layers `[start, end)` (all when None), reading only the tensors they need.
    `progress`: bars on stderr as it reads and packs (None: only when stderr is a
    terminal; runtime.progress)."""
    family, args = model_args(model_dir)
    layers = layers or LayerRange(0, family.num_layers(args))
    reader = reader or CheckpointReader(Path(model_dir), dtype=dtype)
    with bars(f"layers {layers}", progress) as report:
        reader.progress = report
        try:
            return family.load_stage(reader, args, layers)
        finally:
            reader.progress = quiet


def load_pipeline(model_dir: Path, ranges: list[LayerRange]) -> list[Stage]:
    return [load_stage(model_dir, r) for r in ranges]
