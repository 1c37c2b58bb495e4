"""What the partitioner knows about a model: its layers and where they are placed.

Layer ranges are half-open `[start, end)` everywhere, as in Python slices, so adjacent
stages share a boundary value and never a layer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from butterfly.types.errors import LayerRangeError
from butterfly.types.ids import NodeId


@dataclass(frozen=True)
class Linear:
    input_dim: int
    output_dim: int


@dataclass(frozen=True)
class Activation:
    kind: str  # "relu", "gelu", "silu", "tanh"


@dataclass(frozen=True)
class Embedding:
    vocab_size: int
    hidden_dim: int


@dataclass(frozen=True)
class TransformerBlock:
    """The specification's generic block (pre-norm, bidirectional, no KV cache)."""

    hidden_dim: int
    num_heads: int
    ff_dim: int


@dataclass(frozen=True)
class DecoderBlock:
    """A causal self-attention block with a KV cache (Llama, GPT-2)."""

    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    ff_dim: int


@dataclass(frozen=True)
class EncoderBlock:
    """A bidirectional post-norm block (BERT)."""

    hidden_dim: int
    num_heads: int
    ff_dim: int


LayerType = Linear | Activation | Embedding | TransformerBlock | DecoderBlock | EncoderBlock


@dataclass(frozen=True)
class LayerInfo:
    """Cost of one layer, as the partitioner sees it.

    The embedding's cost is folded into layer 0 and the final norm + output head into the
    last layer, so a placement that balances these figures balances real stages (the head
    of a large-vocabulary model costs about two decoder layers).
    """

    id: int
    layer_type: LayerType
    compute_cost: float  # FLOPs per token
    memory_bytes: int  # parameter bytes held by the stage that runs this layer
    output_size: int  # elements per token leaving this layer (hidden size)
    kv_bytes_per_token: int = 0  # KV cache growth per token of context
    activation_bytes_per_token: int = 0  # bytes per token sent to the next stage


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open range `[start, end)` of layer indices."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise LayerRangeError(f"layer range [{self.start}, {self.end}) is empty or negative")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def check_within(self, num_layers: int) -> None:
        if self.end > num_layers:
            raise LayerRangeError(
                f"layer range [{self.start}, {self.end}) is out of bounds: "
                f"the model has {num_layers} layers (valid ranges lie within [0, {num_layers}))"
            )

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


@dataclass(frozen=True)
class ModelPartition:
    """One stage of a plan: a node and the contiguous layers it runs."""

    node: NodeId
    layers: LayerRange
    estimated_ms: float = 0.0


class PartitionStrategy(enum.StrEnum):
    UNIFORM = "uniform"
    LOAD_BALANCED = "load_balanced"
    TOPOLOGY_AWARE = "topology_aware"
    HYBRID = "hybrid"
