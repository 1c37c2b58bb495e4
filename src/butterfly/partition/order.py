"""Which order to chain nodes in: the part of topology-aware placement that is not a split.

A pipeline sends every token's activations across each boundary once, so the order of the
nodes decides which links carry traffic. For a few nodes every order is tried (5 nodes:
120 orders, each split optimally). For more, the number of orders explodes and the choice
is a heuristic: a shortest Hamiltonian path over the links, weighted by the time one
boundary's activations take (a path travelling-salesman problem), approximated by greedy
nearest-neighbour chains improved with 2-opt until no reversal shortens the path. The
split that follows is still optimal for the order found. Plain id order is a candidate
too, split whenever its links are competitive with the chains' (ids that follow racks).

Links are treated as symmetric here (the mean of both directions): 2-opt reverses
segments, and with asymmetric weights each reversal would cost O(segment) to price. The
plan itself is evaluated with the real, directed links.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from butterfly.partition.capability import NodeCapability

EXACT_MAX_NODES = 5
"""Up to this many nodes, every order is tried; above, the heuristic picks a few."""

_MISSING = 1e9
"""A missing link's weight inside the heuristic: far worse than any measured one."""

MAX_TWO_OPT_MOVES = 2000

ORDER_SLACK = 0.25
"""Candidate orders whose total link time exceeds the shortest by more are not split."""


def link_ms(nodes: Sequence[NodeCapability], nbytes: int) -> list[list[float]]:
    """ms[i][j]: time for `nbytes` to go from nodes[i] to nodes[j]; inf if never measured.

    A link measured only from the far end counts for both directions (`link_between`).
    """
    m = len(nodes)
    ids = np.array([node.id for node in nodes], dtype=np.float64)
    by_id = np.argsort(ids)
    table = np.concatenate([node.link_table for node in nodes])
    rows = np.repeat(np.arange(m), [len(node.link_table) for node in nodes])
    cols = by_id[np.minimum(np.searchsorted(ids, table[:, 0], sorter=by_id), m - 1)]
    known = ids[cols] == table[:, 0]  # links to nodes outside this set are ignored
    ms = np.full((m, m), np.nan)
    ms[rows[known], cols[known]] = table[known, 1] + 1000.0 * nbytes / table[known, 2]
    ms = np.where(np.isnan(ms), ms.T, ms)
    ms = np.where(np.isnan(ms), np.inf, ms)
    np.fill_diagonal(ms, 0.0)
    out: list[list[float]] = ms.tolist()
    return out


def heuristic_orders(
    nodes: Sequence[NodeCapability], ms: Sequence[Sequence[float]]
) -> list[tuple[int, ...]]:
    """A few good orders (indices into `nodes`), best first, each worth an optimal split.

    Chains start from the fastest node and from the best-connected one (smallest total
    link time); 2-opt then moves them to a local optimum of total transfer time. Id order
    joins them, and every candidate whose path costs more than `ORDER_SLACK` above the
    best one is dropped: each survivor costs a full split (a few ms for 64 nodes), and an
    order whose links are that much slower in total rarely wins. When ids follow racks,
    id order is as short as the chains and stays in.
    """
    w = np.minimum(np.asarray(ms, dtype=np.float64), _MISSING)
    w = (w + w.T) / 2
    fastest = max(range(len(nodes)), key=lambda i: (nodes[i].flops_per_s, -i))
    central = int(np.argmin(w.sum(axis=1)))
    found: list[tuple[int, ...]] = []
    for path in (
        *(tuple(_two_opt(_nearest_neighbour(w, start), w)) for start in (fastest, central)),
        tuple(range(len(nodes))),
    ):
        if path not in found:
            found.append(path)
    length = [float(sum(w[a, b] for a, b in itertools.pairwise(p))) for p in found]
    shortest = min(length)
    return [
        p
        for p, x in sorted(zip(found, length, strict=True), key=lambda pair: pair[1])
        if x <= shortest * (1 + ORDER_SLACK)
    ]


def _nearest_neighbour(w: npt.NDArray[np.float64], start: int) -> list[int]:
    rows: list[list[float]] = w.tolist()  # plain floats: 64 short scans beat numpy calls
    path = [start]
    free = [i for i in range(len(rows)) if i != start]
    while free:
        row = rows[path[-1]]
        nxt = min(free, key=row.__getitem__)  # ties go to the lowest index: deterministic
        path.append(nxt)
        free.remove(nxt)
    return path


def _two_opt(path: list[int], w: npt.NDArray[np.float64]) -> list[int]:
    """Best-improvement 2-opt on an open path.

    An open path is a closed tour through one extra "virtual" node joined to every node at
    zero cost; cutting the tour there gives the path back. Each round prices every
    reversal at once with numpy and applies the best one.
    """
    m = len(path)
    if m < 3:
        return path
    big = np.zeros((m + 1, m + 1))
    big[:m, :m] = w
    tour = np.array([*path, m])
    length = m + 1
    nxt = np.roll(np.arange(length), -1)
    at = np.arange(length)
    # Reversing tour[i+1 .. j] swaps edges (i, i+1), (j, j+1) for (i, j), (i+1, j+1);
    # only j >= i + 2 changes anything, and (0, last) is the same two edges again.
    barred = np.where(np.triu(np.ones((length, length), dtype=bool), k=2), 0.0, np.inf)
    barred[0, length - 1] = np.inf
    for _ in range(MAX_TWO_OPT_MOVES):
        x = big[np.ix_(tour, tour)]
        edge = x[at, nxt]  # edge[i] = weight of tour[i] -> tour[i + 1]
        gain = x + x[np.ix_(nxt, nxt)] - edge[:, None] - edge[None, :] + barred
        i, j = np.unravel_index(int(np.argmin(gain)), gain.shape)
        if gain[i, j] >= -1e-12:
            break
        tour[i + 1 : j + 1] = tour[i + 1 : j + 1][::-1].copy()
    cut = int(np.flatnonzero(tour == m)[0])
    return [int(v) for v in np.concatenate((tour[cut + 1 :], tour[:cut]))]
