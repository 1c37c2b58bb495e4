"""Vocabulary shared by every component: ids, model and task descriptions, errors."""

from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import (
    Activation,
    DecoderBlock,
    Embedding,
    EncoderBlock,
    LayerInfo,
    LayerRange,
    LayerType,
    Linear,
    ModelPartition,
    PartitionStrategy,
    TransformerBlock,
)
from butterfly.types.tasks import (
    InferenceResult,
    InferenceTask,
    Sampled,
    SamplingParams,
    StageRecord,
)

__all__ = [
    "Activation",
    "DecoderBlock",
    "Embedding",
    "EncoderBlock",
    "Epoch",
    "InferenceResult",
    "InferenceTask",
    "LayerInfo",
    "LayerRange",
    "LayerType",
    "Linear",
    "ModelPartition",
    "NodeId",
    "PartitionStrategy",
    "RequestId",
    "Sampled",
    "SamplingParams",
    "StageIndex",
    "StageRecord",
    "TransformerBlock",
]
