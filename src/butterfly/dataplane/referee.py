"""The gateway's own re-execution of a stage: what an audit's or a replicate lane's
dispute is settled by (the client trusts the gateway, DESIGN.md section 3)."""

from __future__ import annotations

from pathlib import Path

import torch

from butterfly.runtime.loader import load_stage
from butterfly.runtime.precision import FP32, Precision
from butterfly.runtime.stage import Stage, prefill_outputs
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.model import LayerRange


class Referee:
    """The gateway's own re-execution of a stage, loaded on first dispute."""

    def __init__(
        self, model_dir: Path, torch_thread: TorchThread, precision: Precision = FP32
    ) -> None:
        """`torch_thread`: the node's one thread for torch (runtime.torch_thread).
        `precision`: the stages' own (model.dtype, model.quantization): a re-execution
        in another precision would disagree with every honest node."""
        self._model_dir, self._precision = model_dir, precision
        self._stages: dict[LayerRange, Stage] = {}
        self._torch = torch_thread

    async def run(
        self, layers: LayerRange, x: torch.Tensor, *, outputs_from: int = 0
    ) -> torch.Tensor:
        def compute() -> torch.Tensor:
            stage = self._stages.get(layers)
            if stage is None:
                stage = self._stages[layers] = load_stage(
                    self._model_dir, layers, precision=self._precision
                )
            with torch.inference_mode():
                return prefill_outputs(stage, x, stage.new_cache(), outputs_from=outputs_from)

        return await self._torch.run(compute)
