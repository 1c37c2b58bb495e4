"""Placement of contiguous layer ranges onto nodes: pure, deterministic functions.

capability  NodeCapability, Link, the shared cost model, input validation and sorting
split       the optimal split over a fixed node order (dynamic program)
order       choosing a node order along measured links (exact when small, 2-opt when large)
pipeline    uniform, load_balanced, topology_aware, hybrid and their registry
quality     Plan, estimate_quality, estimate_per_token_ms
service     PartitionService: LRU cache, hit/miss counters, degradation
replan      re-placing after a node joins or leaves, moving as few layers as is cheap
"""

from butterfly.partition.capability import DEFAULT_CONTEXT_TOKENS, Link, NodeCapability
from butterfly.partition.pipeline import (
    STRATEGIES,
    hybrid,
    load_balanced,
    strategy_named,
    topology_aware,
    uniform,
)
from butterfly.partition.quality import Plan, Quality, estimate_per_token_ms, estimate_quality

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "STRATEGIES",
    "Link",
    "NodeCapability",
    "Plan",
    "Quality",
    "estimate_per_token_ms",
    "estimate_quality",
    "hybrid",
    "load_balanced",
    "strategy_named",
    "topology_aware",
    "uniform",
]
