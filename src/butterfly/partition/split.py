"""The optimal split of a model's layers over a fixed sequence of nodes.

Every pipeline strategy ends here. Given nodes in pipeline order, give each a contiguous,
possibly empty range of layers so that the slowest stage is as fast as possible:

    time(k, [s, e)) = (flops[e] - flops[s]) / rate_k  +  overhead_k * (e - s)  +  send_k(e)

where `send_k(e)` is the transfer to the next node of the order (0 when `e` is the last
layer, so the final stage sends nothing), `overhead_k` is a fixed cost per layer (the
node's measured `layer_overhead_ms`, plus the caller's `overhead_ms`, which the
WorkAssigner model uses), and no stage may hold more bytes than its node.

Dynamic program. `D_k(e)` = the smallest bottleneck that covers layers `[0, e)` with the
first `k + 1` nodes, each used or left empty:

    D_k(e) = min( D_{k-1}(e),                                   node k left empty
                  min over s of max(D_{k-1}(s), time(k, [s, e))) )

`D_{k-1}` never decreases with `s` (covering fewer layers is never harder) and
`time(k, [s, e))` never increases with `s`, so the inner minimum sits where the two curves
cross; one `searchsorted` finds that crossing for every `e` at once. With the memory bound
as a lower limit on `s`, one node costs a dozen vectorised passes over `n + 1` numbers:
O(m n log n) in all, a few milliseconds for 1000 layers on 64 nodes.

Leaving a node empty is free of charge in the recurrence, but a node skipped *between* two
used ones changes who sends to whom. The sends charged then are those of the order, not of
the plan. The caller checks `Split.contiguous` and, when it matters, re-runs on the order
without the skipped nodes (where the charges are true again) or calls `split_prefix`, which
solves the no-skip version exactly by bisection on the bottleneck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from butterfly.partition.capability import Costs, FloatArray, IntArray, NodeCapability, fmt_bytes
from butterfly.types.ids import NodeId

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Split:
    """Stages as `(index into the order, start, end)`, first stage first."""

    stages: tuple[tuple[int, int, int], ...]
    bottleneck_ms: float  # as charged by the solver

    @property
    def contiguous(self) -> bool:
        """True when no unused node sits between two used ones (charges are then exact)."""
        used = [k for k, _, _ in self.stages]
        return used[-1] - used[0] == len(used) - 1


def _stage_ms(costs: Costs, node: NodeCapability, overhead_ms: float) -> npt.NDArray[np.float64]:
    """q[i] = milliseconds node needs for layers [0, i); a stage [s, e) costs q[e] - q[s]."""
    q = costs.flops * (1000.0 / node.flops_per_s)
    per_layer = overhead_ms + node.layer_overhead_ms
    if per_layer:
        q = q + per_layer * np.arange(costs.n + 1)
    return q


class Tables:
    """Per-node arrays the DP reads, computed once and reused across the orders tried."""

    def __init__(self, costs: Costs, overhead_ms: float = 0.0) -> None:
        self.costs, self.overhead_ms = costs, overhead_ms
        self._rows: dict[NodeId, tuple[FloatArray, IntArray, FloatArray]] = {}

    def prepare(self, nodes: Sequence[NodeCapability]) -> None:
        """Compute the rows of many nodes at once: one numpy call each, not one per node."""
        todo = [node for node in nodes if node.id not in self._rows and node.flops_per_s > 0]
        if not todo:
            return
        n, memory = self.costs.n, self.costs.memory
        scale = 1000.0 / np.array([node.flops_per_s for node in todo])
        qs = self.costs.flops[None, :] * scale[:, None]
        per_layer = self.overhead_ms + np.array([node.layer_overhead_ms for node in todo])
        if per_layer.any():
            qs += per_layer[:, None] * np.arange(n + 1)[None, :]
        caps = np.array([node.memory_bytes for node in todo], dtype=np.int64)
        los = np.searchsorted(memory, (memory[None, :] - caps[:, None]).ravel()).reshape(qs.shape)
        latest = np.arange(n + 1) - 1
        barred = np.where(los <= latest[None, :], 0.0, np.inf)
        los = np.minimum(los, np.maximum(latest, 0)[None, :])  # keep barred starts legal
        for k, node in enumerate(todo):
            self._rows[node.id] = (qs[k], los[k], qs[k] + barred[k])

    def row(self, node: NodeCapability) -> tuple[FloatArray, IntArray, FloatArray]:
        """(q, lo, qb) for a node.

        q: stage times as prefix differences; lo[e]: the first start whose stage ending at
        e fits in memory; qb: q, but inf where no stage can end at e (layer e - 1 alone
        does not fit), so a stage ending there prices itself out without a branch.
        """
        if node.id not in self._rows:
            self.prepare([node])
        return self._rows[node.id]


def split(
    costs: Costs,
    order: Sequence[NodeCapability],
    send_ms: Sequence[float],
    *,
    overhead_ms: float = 0.0,
    tables: Tables | None = None,
) -> Split | None:
    """Minimum-bottleneck split over `order` (see the module docstring); None if nothing fits.

    `send_ms[k]` is the transfer time from `order[k]` to `order[k + 1]` (math.inf when they
    cannot talk, 0 when transfers are not modelled). Nodes with `flops_per_s == 0` are
    left empty. Pass the same `tables` when splitting the same layers over many orders.
    """
    tables = tables or Tables(costs, overhead_ms)
    tables.prepare(order)
    n = costs.n
    hi = np.arange(n + 1) - 1  # a stage ending at e starts at e - 1 at the latest
    hi[0] = 0  # e = 0 has no stage; `valid` masks it out, this only keeps indexing legal
    d = np.full(n + 1, np.inf)
    d[0] = 0.0
    choices: list[npt.NDArray[np.int64] | None] = []
    for k, node in enumerate(order):
        if node.flops_per_s <= 0:
            choices.append(None)
            continue
        q, lo, qb = tables.row(node)
        target = qb + send_ms[k]
        target[n] = qb[n]  # the last stage sends nothing
        # Stage [s, e) is no slower than D(s) iff D(s) + q[s] >= q[e] + send(e): the crossing.
        cross = (d[:n] + q[:n]).searchsorted(target)
        # The best start is the crossing or the one before it (rounding can only shift the
        # crossing between two starts whose bottlenecks agree to the last bit or so).
        s1 = np.minimum(np.maximum(cross, lo), hi)
        s0 = np.maximum(s1 - 1, lo)  # == s1 where s1 is the first start memory allows
        v1 = np.maximum(d[s1], target - q[s1])
        v0 = np.maximum(d[s0], target - q[s0])
        first = v0 < v1
        best = np.where(first, v0, v1)
        use = best < d  # on a tie, leave it empty: same bottleneck, one hop fewer
        d = np.where(use, best, d)
        choices.append(np.where(use, np.where(first, s0, s1), -1))
    if not math.isfinite(d[n]):
        return None
    stages: list[tuple[int, int, int]] = []
    e, k = n, len(order) - 1
    while e > 0:
        row = choices[k]
        if row is None or row[e] < 0:
            k -= 1
            continue
        s = int(row[e])
        stages.append((k, s, e))
        e, k = s, k - 1
    return Split(tuple(reversed(stages)), float(d[n]))


def split_prefix(
    costs: Costs,
    order: Sequence[NodeCapability],
    send_ms: Sequence[float],
    *,
    overhead_ms: float = 0.0,
    rel_tol: float = 1e-12,
) -> Split | None:
    """Minimum-bottleneck split where the used nodes are a prefix of `order`, all non-empty.

    Without skips the DP's monotonicity is gone (a slow node forced to take a layer can make
    covering fewer layers harder), so this bisects on the bottleneck T instead: the set of
    layer counts the first k nodes can cover within T is propagated node by node, exactly.
    Slower than `split` (O(m n) per probe, ~45 probes); used for small clusters only.
    """
    n = costs.n
    qs = [_stage_ms(costs, node, overhead_ms) if node.flops_per_s > 0 else None for node in order]
    sends = []
    for k in range(len(order)):
        send = np.full(n + 1, send_ms[k])
        send[n] = 0.0
        sends.append(send)
    mem_lo = [
        np.searchsorted(costs.memory, costs.memory - node.memory_bytes, side="left")
        for node in order
    ]
    idx = np.arange(n + 1)

    def lower_bounds(k: int, q: npt.NDArray[np.float64], t: float) -> npt.NDArray[np.int64]:
        """Smallest start s for each end e: time within t and bytes within memory."""
        by_time: npt.NDArray[np.int64] = np.searchsorted(q, q + sends[k] - t, side="left")
        return np.maximum(by_time, mem_lo[k])

    def reach(t: float) -> list[BoolArray] | None:
        """Per node, which layer counts the prefix up to it can cover within t."""
        r = idx == 0
        sets = []
        for k, q in enumerate(qs):
            if q is None:
                return None
            last = np.maximum.accumulate(np.where(r, idx, -1))
            prev = np.concatenate(([-1], last[:-1]))  # largest reachable s <= e - 1
            r = prev >= lower_bounds(k, q, t)
            sets.append(r)
            if r[n]:
                return sets
            if not r.any():
                return None
        return None

    finite = [s for s in send_ms if math.isfinite(s)]
    hi = max((float(q[n]) for q in qs if q is not None), default=0.0)
    hi += max(finite, default=0.0) + 1.0
    sets = reach(hi)
    if sets is None:
        return None
    lo = 0.0
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if (probe := reach(mid)) is not None:
            hi, sets = mid, probe
        else:
            lo = mid
    stages: list[tuple[int, int, int]] = []
    e = n
    for k in range(len(sets) - 1, -1, -1):
        q = qs[k]
        if q is None:  # unreachable: reach() stops at the first unmeasured node
            return None
        prev_set = sets[k - 1] if k > 0 else idx == 0
        floor = int(lower_bounds(k, q, hi)[e])
        s = int(np.flatnonzero(prev_set[floor:e])[-1]) + floor
        stages.append((k, s, e))
        e = s
    return Split(tuple(reversed(stages)), hi)


def fits(costs: Costs, order: Sequence[NodeCapability]) -> bool:
    """Whether the layers fit in `order`'s memory at all, ignoring speed.

    Filling each node as full as it goes is optimal for contiguous ranges: any feasible
    split's first k stages end no further than the greedy fill of the first k nodes.
    """
    start = 0
    for node in order:
        start = _fill(costs, start, node.memory_bytes)
    return start == costs.n


def _fill(costs: Costs, start: int, capacity: int) -> int:
    """The furthest end e with layers [start, e) within capacity."""
    end = int(np.searchsorted(costs.memory, costs.memory[start] + capacity, side="right"))
    return max(start, end - 1)


def shortfall(costs: Costs, order: Sequence[NodeCapability]) -> str:
    """Why the layers do not fit on `order`, naming the stage, the node and the bytes missing.

    Fills nodes in pipeline order as full as memory allows (the fill that leaves the least
    for the last node); the last node then lacks exactly the bytes reported.
    """
    need = np.diff(costs.memory)
    kv = f"weights + KV cache for {costs.context_tokens} tokens"
    biggest = max(order, key=lambda node: (node.memory_bytes, -node.id))
    worst = int(np.argmax(need))
    if need[worst] > biggest.memory_bytes:
        missing = int(need[worst]) - biggest.memory_bytes
        return (
            f"layer {worst} alone needs {fmt_bytes(int(need[worst]))} ({kv}) but the largest "
            f"node, node {biggest.id}, has {fmt_bytes(biggest.memory_bytes)}: "
            f"{fmt_bytes(missing)} missing on whichever node runs it. Add a larger node or "
            f"lower the context budget."
        )
    start, stage = 0, 0
    for node in order[:-1]:
        end = _fill(costs, start, node.memory_bytes)
        if end > start:
            start, stage = end, stage + 1
    last = order[-1]
    last_need = costs.stage_memory(start, costs.n)
    total = int(costs.memory[-1])
    offered = sum(node.memory_bytes for node in order)
    return (
        f"the model needs {fmt_bytes(total)} ({kv}); the {len(order)} node(s) offer "
        f"{fmt_bytes(offered)}. Filling nodes in pipeline order, stage {stage} on node "
        f"{last.id} would hold layers [{start}, {costs.n}) = {fmt_bytes(last_need)} but has "
        f"{fmt_bytes(last.memory_bytes)}: {fmt_bytes(last_need - last.memory_bytes)} missing. "
        f"Add a node with at least that much memory or lower the context budget."
    )
