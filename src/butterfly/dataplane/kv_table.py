"""A node's KV caches, one per request, with what each request keeps beside its cache.

Bounded whatever the gateway does: at most `max_caches` (the least recently used one goes
when a new one would pass the cap) and none idle longer than `ttl_s`, so a lost or
withheld `Release` costs memory for a while, not for ever. A request whose cache went
that way gets a retriable error on its next step naming why; the gateway then replays it
from its token history. Beside each cache: the positions already copied to the standbys
of the node's range (`to_ship`, `mark_shipped`; a step that cuts the cache back lowers
the mark), and on the gateway the outputs its own stage computed for the audit (`kept`):
both go when the request is released or its cache evicted; a new plan that drops every
cache leaves the kept outputs (`drop_all`). A copy from a chain node stays a copy until
a step here computes on it (`own`): from then on no copy may write into it.

`dataplane.stage_server` decides when caches are made, cut back and copied; this module
only holds them, so the bounds are tested in one process with a fake clock
(`tests/test_kv_table.py`; with a stage and the gateway's replays, `tests/test_kv_bounds.py`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from butterfly.runtime.kvcache import KVCache
from butterfly.types.errors import InvalidMessage, StageLost
from butterfly.types.ids import NodeId, RequestId

log = logging.getLogger(__name__)

MAX_CACHES = 1024
CACHE_TTL_S = 600.0
EVICTIONS_REMEMBERED = 4096
"""Evicted request ids kept to explain a later step's missing cache; the oldest go first."""


class KvTable:
    def __init__(
        self, node: NodeId, *, max_caches: int, ttl_s: float, clock: Callable[[], float]
    ) -> None:
        self.node = node
        self.caches: dict[RequestId, KVCache | None] = {}
        self._shipped: dict[RequestId, int] = {}  # request -> positions already at the standbys
        # requests whose cache is a chain node's copy that no step here has computed on,
        # with the epoch of the last copy taken into it
        self._copies: dict[RequestId, int] = {}
        # request -> (start, output) of each step, in position order
        self.kept: dict[RequestId, list[tuple[int, torch.Tensor]]] = {}
        self._max, self._ttl, self._clock = max(1, max_caches), ttl_s, clock
        self._used: OrderedDict[RequestId, float] = OrderedDict()  # least recent first
        self._evicted: OrderedDict[RequestId, str] = OrderedDict()  # request -> why

    def usage(self) -> tuple[int, int]:
        """(caches, bytes) held; safe to call from a metrics scrape on another thread (a
        copy of the table is taken in one step, under the GIL)."""
        caches = [c for c in list(self.caches.values()) if c is not None]
        return len(caches), sum(c.nbytes for c in caches)

    def lengths(self, request_ids: Iterable[RequestId]) -> tuple[int, ...]:
        """Each request's cached positions (0: none held)."""
        return tuple(
            cache.length if (cache := self.caches.get(rid)) is not None else 0
            for rid in request_ids
        )

    def cache_for(
        self,
        request_id: RequestId,
        start: int,
        batch: Iterable[RequestId],
        new: Callable[[], KVCache | None],
        epoch: int = 0,
    ) -> KVCache | None:
        """The request's cache, cut back to `start` (a re-run after recovery recomputes
        from there); a request's first step creates it with `new`. `batch`: the step's
        requests, whose caches making room for this one must not take.

        A step of `epoch` goes on from a chain node's copy only if every copy in it came
        under an earlier plan: a standby taking the stage over. A copy under the plan of
        the step is a chain node writing into a request this node computes beside it (a
        replicate lane, steps routed around it), once its own cache was evicted (by
        the chain node's own flood of copies, a review): it goes, and the request
        replays from 0."""
        copied = self._copies.get(request_id)
        if copied is not None and start > 0 and copied >= epoch:
            what = f"a chain node's copy taken under the plan of epoch {copied}"
            self.evict(request_id, what)
            raise StageLost(
                f"request {request_id}'s KV cache on node {self.node} is {what}, on which "
                "no step here computed: replay it from position 0"
            )
        if request_id not in self.caches:
            if start != 0:
                why = self._evicted.get(request_id)
                if why is not None:  # the gateway replays it from its token history
                    raise StageLost(
                        f"request {request_id}'s KV cache on node {self.node} was evicted "
                        f"({why}); replay it from position 0"
                    )
                raise InvalidMessage(
                    f"request {request_id} has no KV cache on node {self.node} "
                    f"to continue at position {start}"
                )
            self.make_room(batch)
            self._evicted.pop(request_id, None)
            self.caches[request_id] = new()
        self.touch(request_id)
        cache = self.caches[request_id]
        if cache is not None:
            if start > cache.length:
                raise InvalidMessage(
                    f"request {request_id} continues at {start}, cache holds {cache.length}"
                )
            cache.truncate(start)
            if self._shipped.get(request_id, 0) > start:
                self._shipped[request_id] = start  # recomputed positions are copied again
        self._copies.pop(request_id, None)  # computed on here: this node's own from now on
        return cache

    def own(self, request_id: RequestId) -> bool:
        """Whether a step here computed on the request's cache (it is no copy only)."""
        return request_id in self.caches and request_id not in self._copies

    def put_copy(self, request_id: RequestId, cache: KVCache, epoch: int) -> None:
        """A cache built elsewhere (a chain node's copy, taken under the plan of `epoch`)
        becomes the request's, until a step here computes on it."""
        self.caches[request_id] = cache
        self._copies[request_id] = epoch
        self.touch(request_id)

    def room_for_copy(self, request_id: RequestId) -> bool:
        """Whether a new copy fits, evicting the least recent copies only: a chain node
        may copy any request ids it likes, and its copies evicted the caches this node
        computes with (a review)."""
        self.expire()
        for rid in [r for r in self._used if r in self._copies and r != request_id]:
            if len(self.caches) < self._max:
                break
            self.evict(rid, f"{self._max} caches held (resources.max_kv_caches); least recent copy")
        return len(self.caches) < self._max

    def touch(self, request_id: RequestId) -> None:
        self._used[request_id] = self._clock()
        self._used.move_to_end(request_id)

    def to_ship(self, request_id: RequestId, length: int) -> int:
        """Where the positions of a request's cache (of `length`) not yet copied to its
        standbys begin."""
        return min(self._shipped.get(request_id, 0), length)

    def mark_shipped(self, request_id: RequestId, length: int) -> None:
        """The request's first `length` positions are at its standbys."""
        self._shipped[request_id] = length

    def release(self, request_id: RequestId) -> None:
        self.caches.pop(request_id, None)
        self._used.pop(request_id, None)
        self._shipped.pop(request_id, None)
        self._copies.pop(request_id, None)
        self.kept.pop(request_id, None)

    def _remember(self, request_id: RequestId, why: str) -> None:
        self._evicted[request_id] = why
        self._evicted.move_to_end(request_id)
        while len(self._evicted) > EVICTIONS_REMEMBERED:
            self._evicted.popitem(last=False)

    def evict(self, request_id: RequestId, why: str) -> None:
        log.warning("node %s: KV cache of %s evicted: %s", self.node, request_id, why)
        self.release(request_id)
        self._remember(request_id, why)

    def drop_all(self, why: str) -> None:
        """Every cache goes; a later step of one of their requests is told to replay it.
        Kept outputs are not dropped here: they go with `release`."""
        if self.caches:
            log.info("node %s: %d KV cache(s) dropped: %s", self.node, len(self.caches), why)
        for rid in self.caches:
            self._remember(rid, why)
        self.caches.clear()
        self._used.clear()
        self._shipped.clear()
        self._copies.clear()

    def expire(self) -> int:
        """Drop the caches idle longer than the TTL (a lost Release, a gateway that went
        away); how many went."""
        now, gone = self._clock(), 0
        while self._used:
            rid, used = next(iter(self._used.items()))
            if now - used <= self._ttl:
                break
            self.evict(rid, f"idle for {now - used:.0f} s (resources.kv_cache_ttl_s)")
            gone += 1
        return gone

    def make_room(self, keep: Iterable[RequestId]) -> None:
        """Before a new cache: expire idle ones, then evict the least recently used until
        one more fits, never one of `keep` (the step being computed uses them)."""
        self.expire()
        spare = set(keep)
        for rid in [r for r in self._used if r not in spare]:
            if len(self.caches) < self._max:
                return
            self.evict(rid, f"{self._max} caches held (resources.max_kv_caches); least recent")

    def keep(
        self,
        request_ids: tuple[RequestId, ...],
        starts: tuple[int, ...],
        lengths: tuple[int, ...],
        out: torch.Tensor,
        offsets: list[int],
    ) -> None:
        """Append each entry's output; the kept steps stay contiguous from their first."""
        for i, (rid, start) in enumerate(zip(request_ids, starts, strict=True)):
            kept = self.kept.setdefault(rid, [])
            if kept and kept[-1][1].shape[2:] != out.shape[2:]:
                kept.clear()  # another range's outputs (the plan moved this node's layers)
            while kept and kept[-1][0] >= start:  # a re-run from `start`
                kept.pop()
            if kept and kept[-1][0] + kept[-1][1].shape[1] > start:  # rolled back into it
                first, rows = kept[-1]
                kept[-1] = (first, rows[:, : start - first])
            if kept and kept[-1][0] + kept[-1][1].shape[1] != start:
                kept.clear()  # a gap: positions computed elsewhere (after a recovery)
            kept.append((start, out[:, offsets[i] : offsets[i] + lengths[i]].clone()))

    def outputs(self, request_id: RequestId, length: int) -> torch.Tensor | None:
        """The kept outputs of positions [0, length), or None when not all of them were
        computed here."""
        kept = self.kept.get(request_id)
        if not kept or kept[0][0] != 0:
            return None
        out = torch.cat([t for _, t in kept], dim=1)
        return out if out.shape[1] == length else None
