"""The stage nodes' KV caches of the gateway's requests: where a request resumes after a
lost step, and freeing them (batched) once it is over."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from butterfly.dataplane.sending import Deliver
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.base import Ask
from butterfly.types.wire.data import CacheQuery, Release

log = logging.getLogger(__name__)

R = TypeVar("R")


class Asker(Protocol):
    """Ask a node (this one included) and get the reply the request declares."""

    async def __call__(self, node: NodeId, msg: Ask[R], /) -> R: ...


class Caches:
    def __init__(
        self,
        *,
        deliver: Deliver,
        ask: Asker | None,
        plan: Callable[[], StagePlan | None],
    ) -> None:
        self._deliver, self._ask, self._plan = deliver, ask, plan
        self._finished: list[RequestId] = []  # requests whose caches the next Release frees
        self._releasing: asyncio.Task[None] | None = None

    async def resume_at(
        self, request_id: RequestId, length: int, route: tuple[NodeId, ...] = ()
    ) -> int:
        """Where a request resumes on a new plan: the fewest positions any stage of its
        `route` (the plan's chain when empty) still caches (survivors keep theirs; a
        promoted standby has the last copy the failed node sent it), and never past the
        last token, whose output is what is missing."""
        plan = self._plan()
        if plan is None or self._ask is None:
            return 0
        ask = self._ask

        async def held(node: NodeId) -> int:
            try:
                reply = await ask(node, CacheQuery((request_id,)))
            except ButterflyError:
                return 0
            ok = reply.request_ids == (request_id,) and len(reply.lengths) == 1
            return reply.lengths[0] if ok else 0

        lengths = await asyncio.gather(*(held(n) for n in route or plan.nodes))
        return max(0, min(*lengths, length - 1))

    async def release(self, *request_ids: RequestId) -> None:
        """Free the requests' KV caches (and standbys' copies) on every node, best effort."""
        plan = self._plan()
        for node in dict.fromkeys((*plan.nodes, *(n for n, _ in plan.replicas))) if plan else ():
            try:
                await self._deliver(node, Release(request_ids), b"")
            except ButterflyError as e:
                log.debug("release of %s on node %s failed: %s", request_ids, node, e)

    async def release_on(self, wire_id: RequestId, nodes: Iterable[NodeId]) -> None:
        """Free one replicate lane's caches on the nodes it ran on, best effort."""
        for node in nodes:
            try:
                await self._deliver(node, Release((wire_id,)), b"")
            except ButterflyError as e:
                log.debug("release of %s on node %s failed: %s", wire_id, node, e)

    def release_finished(self, request_id: RequestId) -> asyncio.Task[None]:
        """Release a finished (or cancelled) request together with every other request
        that finishes in this turn of the event loop: one frame per node per batch instead
        of one per request (3 of the ~4 frames the gateway sent per short request). The
        send runs in its own task, so a caller cancelled while awaiting it still frees."""
        self._finished.append(request_id)
        if self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release_batch())
        return self._releasing

    async def _release_batch(self) -> None:
        await asyncio.sleep(0)  # the other requests finishing in this turn join the frame
        ids, self._finished, self._releasing = tuple(dict.fromkeys(self._finished)), [], None
        await self.release(*ids)
