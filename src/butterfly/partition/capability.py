"""What placement knows about nodes and layers, and the one cost model every strategy shares.

Costs are per token of decoding:

    compute of a stage   = sum(layer.compute_cost) / node.flops_per_s
                           + number of layers * node.layer_overhead_ms
    transfer at a boundary = link.latency_ms + boundary bytes / link.bandwidth_bytes_per_s
    memory of a stage    = sum(layer.memory_bytes + layer.kv_bytes_per_token * context_tokens)

Inputs are validated here, at the boundary, and sorted: layers by id, nodes by id. Sorting
is what makes placement a function of the membership rather than of the order in which a
node happened to hear about its peers: every node that computes the plan from the same
facts gets the same plan, and ties (equal speeds, equal memory) are broken the same way
everywhere (petals `block_selection` sorts for the same reason).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from butterfly.types.errors import InvalidConfiguration, NoNodesAvailable
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo

DEFAULT_CONTEXT_TOKENS = 2048
"""KV cache budget per stage, in tokens of context, when the caller names none."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ACTIVATION_ELEMENT_BYTES = 4
"""Bytes per activation element when a layer does not say (float32 on the wire)."""


@dataclass(frozen=True)
class Link:
    """A measured one-way link: fixed latency plus size over bandwidth."""

    latency_ms: float
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise InvalidConfiguration(f"link latency_ms must be >= 0, got {self.latency_ms}")
        if not (math.isfinite(self.bandwidth_bytes_per_s) and self.bandwidth_bytes_per_s > 0):
            raise InvalidConfiguration(
                f"link bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s}"
            )

    def transfer_ms(self, nbytes: int) -> float:
        return self.latency_ms + 1000.0 * nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True, eq=False)
class NodeCapability:
    """What a node measured about itself and its links; the facts a plan is computed from.

    `flops_per_s == 0` means "not measured yet": strategies that need the rate refuse such
    a node (and the service degrades to one that does not). `links` are frozen on
    construction so a caller mutating its dict cannot change a cached plan's key.

    `layer_overhead_ms` is the fixed time a layer costs on this node whatever its FLOPs
    (launching a score of small operations, reading norms, updating the KV cache). It
    dominates small layers: a 64-wide decoder layer is 0.1 MFLOP, microseconds of
    arithmetic, but a tenth of a millisecond or more of dispatch; without it a rate-only
    model thinks such layers nearly free and their placement arbitrary.
    """

    id: NodeId
    flops_per_s: float
    memory_bytes: int
    links: Mapping[NodeId, Link] = field(default_factory=dict)
    layer_overhead_ms: float = 0.0
    link_table: FloatArray = field(init=False, repr=False)  # rows: peer, latency, bandwidth
    _key: tuple[int, float, int, float, bytes] = field(init=False, repr=False)
    _hash: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flops_per_s) and self.flops_per_s >= 0):
            raise InvalidConfiguration(
                f"node {self.id}: flops_per_s must be >= 0 (0 = not measured), "
                f"got {self.flops_per_s}"
            )
        if self.memory_bytes < 0:
            raise InvalidConfiguration(
                f"node {self.id}: memory_bytes must be >= 0, got {self.memory_bytes}"
            )
        if not (math.isfinite(self.layer_overhead_ms) and self.layer_overhead_ms >= 0):
            raise InvalidConfiguration(
                f"node {self.id}: layer_overhead_ms must be >= 0, got {self.layer_overhead_ms}"
            )
        links = MappingProxyType(dict(sorted(self.links.items())))
        object.__setattr__(self, "links", links)
        # Packed once: a cache lookup hashes and compares every node, and a full mesh has
        # n^2 links. Bytes compare with one memcmp; tuples of Links would compare field by
        # field in Python (0.4 ms for 64 nodes). `+ 0.0` folds -0.0 into 0.0.
        flat = [
            v + 0.0 for p, x in links.items() for v in (p, x.latency_ms, x.bandwidth_bytes_per_s)
        ]
        table = np.array(flat, dtype=np.float64).reshape(-1, 3)
        object.__setattr__(self, "link_table", table)
        key = (
            self.id,
            self.flops_per_s,
            self.memory_bytes,
            self.layer_overhead_ms + 0.0,
            table.tobytes(),
        )
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeCapability):
            return NotImplemented
        return self is other or (self._hash == other._hash and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash


def link_between(a: NodeCapability, b: NodeCapability) -> Link | None:
    """The link a -> b as a measured it, else as b measured it (links are near-symmetric)."""
    return a.links.get(b.id) or b.links.get(a.id)


def boundary_bytes(layer: LayerInfo) -> int:
    """Bytes per token leaving `layer` for the next stage."""
    if layer.activation_bytes_per_token > 0:
        return layer.activation_bytes_per_token
    return layer.output_size * ACTIVATION_ELEMENT_BYTES


def layer_memory(layer: LayerInfo, context_tokens: int) -> int:
    return layer.memory_bytes + layer.kv_bytes_per_token * context_tokens


def sorted_layers(layers: Iterable[LayerInfo]) -> tuple[LayerInfo, ...]:
    """Layers by id, refusing gaps, duplicates and costs that would make the model lie."""
    out = tuple(sorted(layers, key=operator.attrgetter("id")))
    if not out:
        raise InvalidConfiguration("the model has no layers to place")
    for i, layer in enumerate(out):
        if layer.id != i:
            raise InvalidConfiguration(
                f"layer ids must be 0..{len(out) - 1} without gaps or repeats; "
                f"found {layer.id} where {i} was expected"
            )
        if not (math.isfinite(layer.compute_cost) and layer.compute_cost >= 0):
            raise InvalidConfiguration(f"layer {i}: compute_cost must be a finite number >= 0")
        if layer.memory_bytes < 0 or layer.kv_bytes_per_token < 0 or layer.output_size < 0:
            raise InvalidConfiguration(f"layer {i}: sizes must be >= 0")
    return out


def sorted_nodes(nodes: Iterable[NodeCapability]) -> tuple[NodeCapability, ...]:
    out = tuple(sorted(nodes, key=operator.attrgetter("id")))
    if not out:
        raise NoNodesAvailable()
    for a, b in itertools.pairwise(out):
        if a.id == b.id:
            raise InvalidConfiguration(f"node {a.id} is listed twice")
    return out


def layers_key(layers: Sequence[LayerInfo]) -> tuple[tuple[int, float, int, int, int], ...]:
    """A cheap hashable fingerprint of everything placement reads from the layers.

    Hashing the LayerInfo dataclasses themselves costs about 0.7 us each (their layer_type
    is hashed too, though placement never reads it); this is three times cheaper.
    """
    return tuple(
        [
            (
                layer.id,
                layer.compute_cost,
                layer.memory_bytes,
                layer.kv_bytes_per_token,
                boundary_bytes(layer),
            )
            for layer in layers
        ]
    )


@dataclass(frozen=True)
class Costs:
    """Prefix sums over the layers, so any stage's cost is one subtraction."""

    layers: tuple[LayerInfo, ...]
    context_tokens: int
    flops: FloatArray  # flops[i] = compute cost of layers [0, i)
    memory: IntArray  # memory[i] = bytes of layers [0, i), weights + KV budget
    boundary: IntArray  # boundary[i] = bytes per token crossing boundary i (after layer i-1)

    @classmethod
    def of(cls, layers: Iterable[LayerInfo], context_tokens: int) -> Costs:
        if context_tokens < 0:
            raise InvalidConfiguration(f"context_tokens must be >= 0, got {context_tokens}")
        ordered = sorted_layers(layers)
        flops = np.zeros(len(ordered) + 1)
        flops[1:] = np.cumsum([layer.compute_cost for layer in ordered])
        memory = np.zeros(len(ordered) + 1, dtype=np.int64)
        memory[1:] = np.cumsum([layer_memory(layer, context_tokens) for layer in ordered])
        boundary = np.zeros(len(ordered) + 1, dtype=np.int64)
        boundary[1:] = [boundary_bytes(layer) for layer in ordered]
        boundary[-1] = 0  # the last layer's output stays on the last stage
        return cls(ordered, context_tokens, flops, memory, boundary)

    @property
    def n(self) -> int:
        return len(self.layers)

    def stage_flops(self, start: int, end: int) -> float:
        return float(self.flops[end] - self.flops[start])

    def compute_ms(self, node: NodeCapability, start: int, end: int) -> float:
        """Milliseconds `node` needs for layers [start, end) (inf when its rate is unknown)."""
        if node.flops_per_s <= 0:
            return math.inf
        flops_ms = 1000.0 * self.stage_flops(start, end) / node.flops_per_s
        return flops_ms + (end - start) * node.layer_overhead_ms

    def stage_memory(self, start: int, end: int) -> int:
        return int(self.memory[end] - self.memory[start])

    def max_boundary_bytes(self) -> int:
        return int(self.boundary.max())


def fmt_bytes(n: float) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
