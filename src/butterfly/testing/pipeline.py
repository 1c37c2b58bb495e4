"""The gateway's pipeline engine over stage servers in this process, with no network.

Scheduler and API tests need an engine that generates real tokens; this one is the
running data path itself: the gateway's `dataplane.engine.PipelineEngine` driving one
`dataplane.stage_server.StageServer` per stage (nodes 0, 1, ...), each stage loaded
through `apply_plan` from the plan of epoch 1. Frames go from part to part as a node's
dispatcher (`node.Node.handle`) hands them over: a step down the chain, its result back
to the engine, a release to every stage. What it leaves out is what those tests do not
look at: sockets, agreement, heartbeats, verification and recovery.

The stages load on the first request (or `await start()`), on the running event loop;
`close()` stops it. `async with LocalPipeline(model, ranges) as engine:` does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from tokenizers import Tokenizer

from butterfly.dataplane.drafter import ModelDrafter
from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.kv_table import CACHE_TTL_S, MAX_CACHES
from butterfly.dataplane.stage_server import StageServer
from butterfly.metrics.events import Emit, discard
from butterfly.net.framing import Envelope
from butterfly.runtime.loader import model_args
from butterfly.runtime.torch_thread import TorchThread
from butterfly.schedule.engine import ClusterHealth, NodeHealth, TokenSink
from butterfly.types.errors import ConnectionFailed, ServiceUnavailable
from butterfly.types.ids import GATEWAY, Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire.data import Release, StageStep, StepError, StepResult
from butterfly.types.wire.frames import Message

MAX_TENSOR_BYTES = 1 << 28
STEP_TIMEOUT_S = 120.0  # a slow CI machine, not a failure: nothing here is lost
CLUSTER_ID = "local"


class LocalPipeline:
    """An `Engine` (schedule.engine): `run` and `health` are the pipeline engine's."""

    def __init__(
        self,
        model_dir: Path,
        ranges: Sequence[LayerRange],
        *,
        stop_ids: frozenset[int] = frozenset(),
        tokenizer: Tokenizer | None = None,
        max_caches: int = MAX_CACHES,
        cache_ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        recovery_wait_s: float = 10.0,
        emit: Emit = discard,
        draft_model: Path | None = None,
    ) -> None:
        """`max_caches`, `cache_ttl_s`, `clock`: every stage server's KV-cache bounds;
        `recovery_wait_s`: how long the engine waits for a new plan after a lost step;
        `tokenizer`: the model's, for tasks with stop strings; `emit`: the engine's
        metrics events; `draft_model`: the small model the engine drafts with in
        speculative mode "draft" (`dataplane.drafter`)."""
        if not ranges:
            raise ValueError("a pipeline needs at least one stage")
        self._torch = TorchThread(name="butterfly-torch")
        self.servers = {
            NodeId(i): StageServer(
                node=NodeId(i),
                model_dir=model_dir,
                max_tensor_bytes=MAX_TENSOR_BYTES,
                torch_thread=self._torch,
                max_caches=max_caches,
                cache_ttl_s=cache_ttl_s,
                clock=clock,
            )
            for i in range(len(ranges))
        }
        self.plan = StagePlan(Epoch(1), tuple((NodeId(i), r) for i, r in enumerate(ranges)))
        family, args = model_args(model_dir)  # as the node reads them
        self.engine = PipelineEngine(
            node=GATEWAY,
            deliver=self.deliver,
            plan=lambda: self.plan,
            health=self._health,
            max_context=int(getattr(args, "max_context", 0)) or 1,
            input_kind=family.input_kind,
            generates=family.generates,
            eos_ids=stop_ids,
            step_timeout_s=STEP_TIMEOUT_S,
            max_tensor_bytes=MAX_TENSOR_BYTES,
            recovery_wait_s=recovery_wait_s,
            tokenizer=tokenizer,
            emit=emit,
            drafter=ModelDrafter(draft_model, self._torch) if draft_model else None,
        )
        self._batches: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        """Every stage server applies the plan (loading its stage); the engine's batch
        sender starts. Once; later calls return at once."""
        if self._batches is not None:
            return
        self._batches = asyncio.create_task(self.engine.serve_batches())
        for server in self.servers.values():
            ack = await server.apply_plan(self.plan.to_message("local"))
            if not ack.ok:
                raise ConnectionFailed(f"node {ack.node} could not load its stage: {ack.error}")
        self._loaded.set()

    def close(self) -> None:
        """Refuse new work, stop the batch sender, drop queued torch work."""
        self._closed = True
        if self._batches is not None:
            self._batches.cancel()
        self._torch.close(wait=True)

    async def __aenter__(self) -> LocalPipeline:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
        if self._batches is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._batches

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def input_kind(self) -> str:
        return self.engine.input_kind

    @property
    def generates(self) -> bool:
        return self.engine.generates

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        if self._closed:
            raise ServiceUnavailable("the engine is shut down; the node is stopping")
        if self._batches is None:
            await self.start()
        await self._loaded.wait()  # a concurrent first request may still be loading
        return await self.engine.run(task, on_token)

    def health(self) -> ClusterHealth:
        return self.engine.health()

    def _health(self) -> ClusterHealth:
        up = not self._closed
        nodes = tuple(
            NodeHealth(node, "healthy" if up else "failed", "in-process", layers, 0.0)
            for node, layers in self.plan.stages
        )
        return ClusterHealth(
            healthy=up, epoch=self.plan.epoch, nodes=nodes, services={"runtime": up}
        )

    async def deliver(self, peer: NodeId, msg: Message, payload: bytes) -> None:
        """What a node's dispatcher does with the frame, on the node it is for (the
        engine's `deliver`: a test that watches the frames overrides it and calls this)."""
        server = self.servers.get(peer)
        if server is None:
            raise ConnectionFailed(f"node {peer} is not in this pipeline")
        env = Envelope(msg, GATEWAY, self.plan.epoch, CLUSTER_ID, payload=payload)
        match msg:
            case StageStep():
                out = await server.on_step(env)
                if isinstance(out.msg, StepResult | StepError):
                    reply = Envelope(
                        out.msg, peer, self.plan.epoch, CLUSTER_ID, payload=out.payload
                    )
                    await self.engine.on_result(peer, reply)
                else:
                    await self.deliver(out.peer, out.msg, out.payload)
            case Release():
                for request_id in msg.request_ids:
                    server.release(request_id)
            case _:
                raise ConnectionFailed(f"node {peer} does not take {msg.kind} in a local pipeline")


__all__ = ["LocalPipeline"]
