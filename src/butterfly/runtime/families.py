"""The model families Butterfly runs, chosen by a checkpoint's `model_type`."""

from __future__ import annotations

from typing import Any

from butterfly.runtime import bert, gpt2, llama_args, llama_load, sequential
from butterfly.runtime.stage import Family
from butterfly.types.errors import UnknownArchitecture

FAMILIES: dict[str, Family] = {
    **{name: llama_load.FAMILY for name in llama_args.MODEL_TYPES},
    **{name: gpt2.FAMILY for name in gpt2.MODEL_TYPES},
    **{name: bert.FAMILY for name in bert.MODEL_TYPES},
    sequential.MODEL_TYPE: sequential.FAMILY,
}


# Families close to one Butterfly runs, refused with the reason rather than half-run.
REFUSED = {
    "phi3": "Phi-3 fuses qkv_proj and gate_up_proj and uses longrope scaling",
    "gemma": "Gemma scales its embeddings by sqrt(hidden_size) and its norms by (1 + weight)",
    "gemma2": "Gemma 2 adds logit softcapping, sandwich norms and alternating sliding windows",
    "gemma3": "Gemma 3 adds q/k norms with (1 + weight), sandwich norms and local/global RoPE",
}


def refuse_prequantized(config: dict[str, Any]) -> None:
    """A checkpoint quantized before it shipped (FP8, GPTQ, AWQ, bitsandbytes, ...)
    stores its weights with scales beside them (`weight_scale_inv`, `qweight`/`scales`,
    `SCB`) that only its `quantization_config` explains. Read as plain weights, an FP8
    checkpoint loaded without a word and computed with every projection off by its
    scale; so any `quantization_config` is refused by name. Butterfly quantizes an
    unquantized checkpoint itself (`model.quantization = "int8"`)."""
    quant = config.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    raise UnknownArchitecture(
        f"config field quantization_config (quant_method {method!r}) is not supported: "
        "Butterfly loads unquantized checkpoints (float32, bfloat16 or float16 weights) "
        'and quantizes them itself with model.quantization = "int8"; use the '
        "checkpoint's unquantized release"
    )


def family_for(config: dict[str, Any]) -> Family:
    """The family of `model_type`; a family Butterfly does not run, or a checkpoint
    quantized before it shipped, is refused with the reason."""
    if not isinstance(config, dict):  # a config.json holding a list, say
        raise UnknownArchitecture(
            f"config.json must hold a JSON object, got {type(config).__name__}"
        )
    refuse_prequantized(config)
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED:
        raise UnknownArchitecture(
            f"model_type {model_type!r} is not supported: {REFUSED[model_type]}, which "
            f"Butterfly's decoders do not compute; Butterfly runs: {', '.join(sorted(FAMILIES))}"
        )
    raise UnknownArchitecture(
        f"model_type {model_type!r} (architectures {config.get('architectures')}) is not "
        f"supported; Butterfly runs: {', '.join(sorted(FAMILIES))}"
    )
