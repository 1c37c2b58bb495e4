"""The gateway's own re-execution of a stage: what an audit's or a replicate lane's
dispute is settled by (the client trusts the gateway, DESIGN.md section 3), and what
audits a range that failures left with one holder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from butterfly.runtime.loader import layer_infos, load_stage, release_freed_memory
from butterfly.runtime.precision import FP32, Precision
from butterfly.runtime.stage import Stage, prefill_outputs
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.model import LayerInfo, LayerRange


class Referee:
    """The gateway's own re-execution of a stage, loaded on first dispute."""

    def __init__(
        self,
        model_dir: Path,
        torch_thread: TorchThread,
        precision: Precision = FP32,
        room: Callable[[], int] | None = None,
    ) -> None:
        """`torch_thread`: the node's one thread for torch (runtime.torch_thread).
        `precision`: the stages' own (model.dtype, model.quantization): a re-execution
        in another precision would disagree with every honest node. `room`: the bytes
        this node can still load (None: not asked); a range is loaded for an audit only
        where it fits (`fits`), while a dispute loads it whatever it costs."""
        self._model_dir, self._precision, self._room = model_dir, precision, room
        self._stages: dict[LayerRange, Stage] = {}
        self._infos: list[LayerInfo] | None = None  # per-layer costs, for `fits`
        self._torch = torch_thread

    def _overlapping(self, layers: LayerRange) -> list[LayerRange]:
        """The ranges held that share a layer with `layers`."""
        return [r for r in self._stages if r.start < layers.end and layers.start < r.end]

    def _drop_overlapping(self, layers: LayerRange) -> None:
        """Ranges held that share a layer with `layers`: the plan moved its cuts, and
        they would not be asked again. What stays is disjoint, so never more than the
        model (each plan that left a range one holder had the gateway keep another
        cut of the same layers: a review)."""
        stale = self._overlapping(layers)
        for r in stale:
            del self._stages[r]
        if stale:
            release_freed_memory()

    def fits(self, layers: LayerRange) -> str:
        """Why this node cannot load `layers` to audit them ("": it can). A gateway that
        ran out of memory re-executing a range it had no room for would take the
        cluster's front door down with it."""
        if layers in self._stages or self._room is None:
            return ""
        need = self._bytes(layers)
        freed = sum(map(self._bytes, self._overlapping(layers)))  # `_drop_overlapping`
        room = self._room() + freed
        if need > room:
            mib = 2**20
            return f"the gateway has {room / mib:.0f} MiB free, {layers} needs {need / mib:.0f}"
        return ""

    def _bytes(self, layers: LayerRange) -> int:
        """What holding `layers` costs, from the checkpoint's config (read once)."""
        if self._infos is None:
            self._infos = layer_infos(self._model_dir, self._precision)
        return sum(i.memory_bytes for i in self._infos[layers.start : layers.end])

    async def run(
        self, layers: LayerRange, x: torch.Tensor, *, outputs_from: int = 0
    ) -> torch.Tensor:
        def compute() -> torch.Tensor:
            stage = self._stages.get(layers)
            if stage is None:
                self._drop_overlapping(layers)
                stage = self._stages[layers] = load_stage(
                    self._model_dir, layers, precision=self._precision
                )
            with torch.inference_mode():
                return prefill_outputs(stage, x, stage.new_cache(), outputs_from=outputs_from)

        return await self._torch.run(compute)
