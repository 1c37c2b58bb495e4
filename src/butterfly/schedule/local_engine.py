"""An engine that runs every stage in this process: a one-node cluster.

It is the engine of `butterfly cluster up --nodes 1`, and the reference the pipeline
engine is compared with, so it produces exactly the tokens of
`butterfly.runtime.generate.generate`: the same checks, the same `run_pipeline` and
`sample` calls on the same inputs, in the same order.

Torch work runs on one dedicated worker thread, one step (prefill or one decode token) per
hand-off. So the event loop stays free for HTTP and heartbeats while a step computes,
concurrent requests interleave token by token instead of waiting for each other to
finish, and a cancelled request stops at the next token boundary. One thread because
torch already spreads a step over the cores; two steps at once would only contend.

Why not drive `generate()` itself from the worker: a suspended generator sits inside
`torch.inference_mode()`, a thread-local mode, and interleaving several of them on one
thread would exit each other's mode out of order.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from butterfly.runtime.generate import run_pipeline
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.loader import load_stage
from butterfly.runtime.sampling import make_generator, sample
from butterfly.runtime.stage import Stage, check_positions
from butterfly.runtime.torch_thread import TorchThread
from butterfly.schedule.engine import ClusterHealth, NodeHealth, TokenSink
from butterfly.types.errors import InvalidInput, ServiceUnavailable
from butterfly.types.ids import GATEWAY, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask, SamplingParams, StageRecord

"""The node a local engine reports its stages on: it is the gateway itself."""


@dataclass
class _Generation:
    """One request's state on the worker thread: its KV caches and sampling RNG."""

    sampling: SamplingParams
    rng: torch.Generator
    caches: list[KVCache | None] | None = None  # allocated by the first step, on the worker
    step_s: list[float] = field(default_factory=list)


class LocalEngine:
    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        stop_ids: frozenset[int] = frozenset(),
        node: NodeId = GATEWAY,
        address: str = "in-process",
    ) -> None:
        if not stages:
            raise ValueError("a LocalEngine needs at least one stage")
        self.stages = tuple(stages)
        self.stop_ids = stop_ids
        self.node = node
        self.address = address
        self._torch = TorchThread(name="butterfly-torch")
        self._closed = False

    @classmethod
    def load(
        cls,
        model_dir: Path,
        ranges: Sequence[LayerRange] | None = None,
        *,
        stop_ids: frozenset[int] = frozenset(),
    ) -> LocalEngine:
        """Load the model as the given stages (one stage of every layer when None)."""
        stages = [load_stage(model_dir, r) for r in ranges] if ranges else [load_stage(model_dir)]
        return cls(stages, stop_ids=stop_ids)

    @property
    def max_context(self) -> int:
        return self.stages[0].max_context

    @property
    def input_kind(self) -> str:
        return self.stages[0].input_kind

    @property
    def layers(self) -> LayerRange:
        return LayerRange(self.stages[0].layers.start, self.stages[-1].layers.end)

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        """Run `task` to completion, calling `on_token` on the event loop for each token."""
        if self._closed:
            raise ServiceUnavailable("the engine is shut down; the node is stopping")
        started = time.perf_counter()
        if self.input_kind == "vectors":
            if not task.input_vector:
                raise InvalidInput("this model takes an input vector; send `input`")
            vector = await self._torch.run(functools.partial(self._forward_vector, task))
            return self._result(task, output_vector=vector, started=started)
        prompt = list(task.input_ids)
        if not prompt:
            raise InvalidInput("the prompt is empty: give at least one token")
        if task.max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be at least 1, got {task.max_new_tokens}")
        check_positions(0, len(prompt) + task.max_new_tokens - 1, self.max_context)
        gen = _Generation(task.sampling, make_generator(task.sampling))
        out: list[int] = []
        x, pos = prompt, 0
        try:
            for _ in range(task.max_new_tokens):
                step = functools.partial(self._step, gen, x, pos)
                token = await self._torch.run(step)
                out.append(token)
                on_token(token)
                if token in self.stop_ids:
                    break
                pos += len(x)
                x = [token]
        finally:
            gen.caches = None  # a cancelled request's KV cache goes with its last step
        return self._result(task, output_ids=out, started=started, step_s=gen.step_s)

    def _step(self, gen: _Generation, ids: list[int], pos: int) -> int:
        """One pipeline pass and one sampled token (worker thread)."""
        t0 = time.perf_counter()
        if gen.caches is None:
            gen.caches = [s.new_cache() for s in self.stages]
        x = torch.tensor([ids], dtype=torch.int64)
        with torch.inference_mode():
            logits = run_pipeline(self.stages, gen.caches, x, pos)
            token = sample(logits[0, -1], gen.sampling, gen.rng)
        gen.step_s.append(time.perf_counter() - t0)
        return token

    def _forward_vector(self, task: InferenceTask) -> list[float]:
        x = torch.tensor(task.input_vector, dtype=torch.float32)
        with torch.inference_mode():
            caches = [s.new_cache() for s in self.stages]
            out = run_pipeline(self.stages, caches, x, 0, last_only=False)
        return [float(v) for v in out.flatten().tolist()]

    def _result(
        self,
        task: InferenceTask,
        *,
        started: float,
        output_ids: Sequence[int] = (),
        output_vector: Sequence[float] = (),
        step_s: Sequence[float] = (),
    ) -> InferenceResult:
        timings = {"engine_s": time.perf_counter() - started}
        if step_s:
            timings["prefill_s"] = step_s[0]
            timings["decode_s"] = sum(step_s[1:])
        return InferenceResult(
            task_id=task.task_id,
            output_ids=tuple(output_ids),
            output_vector=tuple(output_vector),
            verified="none",
            stages=tuple(StageRecord(self.node, s.layers) for s in self.stages),
            timings=timings,
        )

    def health(self) -> ClusterHealth:
        status = "failed" if self._closed else "healthy"
        node = NodeHealth(self.node, status, self.address, self.layers, last_seen_s=0.0)
        return ClusterHealth(
            healthy=not self._closed, epoch=0, nodes=(node,), services={"runtime": not self._closed}
        )

    def close(self) -> None:
        """Refuse new work, drop queued steps and wait for the one in flight."""
        self._closed = True
        self._torch.close(wait=True)


__all__ = ["LocalEngine"]
