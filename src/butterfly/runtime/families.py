"""The model families Butterfly runs, chosen by a checkpoint's `model_type`."""

from __future__ import annotations

from typing import Any

from butterfly.runtime import bert, gpt2, llama, sequential
from butterfly.runtime.stage import Family
from butterfly.types.errors import UnknownArchitecture

FAMILIES: dict[str, Family] = {
    **{name: llama.FAMILY for name in llama.MODEL_TYPES},
    **{name: gpt2.FAMILY for name in gpt2.MODEL_TYPES},
    **{name: bert.FAMILY for name in bert.MODEL_TYPES},
    sequential.MODEL_TYPE: sequential.FAMILY,
}


def family_for(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UnknownArchitecture(
        f"model_type {model_type!r} (architectures {config.get('architectures')}) is not "
        f"supported; Butterfly runs: {', '.join(sorted(FAMILIES))}"
    )
