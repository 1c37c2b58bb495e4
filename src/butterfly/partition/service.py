"""PartitionService: plans behind an LRU cache, with hit/miss counters and degradation.

Degradation follows what each strategy needs measured, from most to least:

    topology_aware  rates + links   --no links-->   load_balanced
    hybrid          rates (+ links) --no rates-->   load_balanced
    load_balanced   rates           --no rates-->   uniform
    uniform         memory only

A strategy "fails" with `OptimizationFailed` when the facts it needs are missing; the
service then logs the reason, notes it on the plan and tries the next one. A model that
does not fit (`InsufficientResources`) is not degraded: every strategy places the same
layers in the same memory, so a simpler one cannot fit either, and the operator needs the
message saying which node lacks how much. No nodes (`NoNodesAvailable`) and bad input
(`InvalidConfiguration`) are raised as they are.

The counters are plain attributes so a metrics layer can read them without this module
knowing about it (`partition_cache_hit_ratio` is `hits / (hits + misses)`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import replace

from butterfly.partition.capability import (
    DEFAULT_CONTEXT_TOKENS,
    NodeCapability,
    layers_key,
    sorted_nodes,
)
from butterfly.partition.pipeline import STRATEGIES, strategy_named
from butterfly.partition.quality import Plan, Quality, estimate_quality
from butterfly.types.errors import InvalidConfiguration, OptimizationFailed
from butterfly.types.model import LayerInfo, PartitionStrategy

log = logging.getLogger(__name__)

FALLBACK: dict[PartitionStrategy, PartitionStrategy] = {
    PartitionStrategy.TOPOLOGY_AWARE: PartitionStrategy.LOAD_BALANCED,
    PartitionStrategy.HYBRID: PartitionStrategy.LOAD_BALANCED,
    PartitionStrategy.LOAD_BALANCED: PartitionStrategy.UNIFORM,
}

DEFAULT_CACHE_SIZE = 100

CacheKey = tuple[object, tuple[NodeCapability, ...], PartitionStrategy, int]


class PartitionService:
    """Computes plans, remembers the most recent `cache_size` of them, counts hits.

    Not thread-safe: one owner (the node's control loop) calls it.
    """

    def __init__(
        self,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    ) -> None:
        if cache_size < 0:
            raise InvalidConfiguration(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self.context_tokens = context_tokens
        self.hits = 0
        self.misses = 0
        self.degradations = 0
        self.computed_seconds = 0.0  # total time spent computing plans on misses
        self._cache: OrderedDict[CacheKey, Plan] = OrderedDict()

    def plan(
        self,
        layers: Sequence[LayerInfo],
        nodes: Iterable[NodeCapability],
        strategy: str | PartitionStrategy = PartitionStrategy.LOAD_BALANCED,
    ) -> Plan:
        """The plan for these facts, from the cache when the same facts were planned before.

        The key is the layers' costs, the nodes (sorted, so their order does not matter),
        the requested strategy and the context budget; a plan reached by degradation is
        cached under the strategy that was asked for, so the next call does not fail again.
        """
        requested = strategy_named(strategy)
        ordered = sorted_nodes(nodes)
        key: CacheKey = (layers_key(layers), ordered, requested, self.context_tokens)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return cached
        self.misses += 1
        started = time.perf_counter()
        result = self._compute(layers, ordered, requested)
        self.computed_seconds += time.perf_counter() - started
        if self.cache_size:
            self._cache[key] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def _compute(
        self,
        layers: Sequence[LayerInfo],
        nodes: tuple[NodeCapability, ...],
        requested: PartitionStrategy,
    ) -> Plan:
        notes: list[str] = []
        current = requested
        while True:
            try:
                found = STRATEGIES[current](layers, nodes, context_tokens=self.context_tokens)
            except OptimizationFailed as e:
                fallback = FALLBACK.get(current)
                if fallback is None:
                    raise
                reason = f"{current} failed ({e.message}); falling back to {fallback}"
                log.warning("partition: %s", reason)
                notes.append(reason)
                self.degradations += 1
                current = fallback
                continue
            return replace(found, notes=tuple(notes)) if notes else found

    def estimate_quality(
        self, plan: Plan, layers: Iterable[LayerInfo], nodes: Iterable[NodeCapability]
    ) -> Quality:
        return estimate_quality(plan, layers, nodes, context_tokens=self.context_tokens)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._cache)

    def invalidate(self) -> None:
        """Forget every plan (e.g. the model changed); the counters keep counting."""
        self._cache.clear()
