"""The accuracy check of a reduced precision: a model in `precision` against fp32.

Both run the same token sequence, fp32's own greedy continuation of a prompt, so one
early disagreement does not make every later position differ (teacher forcing). Reported:
- `greedy_agreement`: fraction of positions whose argmax equals fp32's;
- `greedy_prefix`: tokens generated freely before the first difference;
- `logit_error_max` / `logit_error_mean`: |logits - fp32 logits|, divided by the standard
  deviation of fp32's logits at that position, so the figure means the same for any
  vocabulary and scale.
docs/MODELS.md quotes it for the demo models; tests/test_accuracy.py holds bounds;
bench/models.py reports it beside the speed of each precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from butterfly.runtime.generate import generate, run_pipeline
from butterfly.runtime.loader import load_stage
from butterfly.runtime.precision import FP32, Precision


@dataclass(frozen=True)
class Accuracy:
    precision: str
    positions: int
    greedy_agreement: float
    greedy_prefix: int
    logit_error_max: float
    logit_error_mean: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def logits_over(model_dir: Path, precision: Precision, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] fp32 logits of one whole-model stage over `ids` in one prefill."""
    stage = load_stage(model_dir, precision=precision)
    with torch.inference_mode():
        out = run_pipeline([stage], [stage.new_cache()], torch.tensor([ids]), 0, last_only=False)
    return out[0].float()


def check_accuracy(
    model_dir: Path, precision: Precision, prompt: list[int], new_tokens: int = 64
) -> Accuracy:
    reference = [load_stage(model_dir, precision=FP32)]
    continuation = list(generate(reference, prompt, new_tokens))
    ids = prompt + continuation
    want = logits_over(model_dir, FP32, ids)[len(prompt) - 1 : -1]  # [new, V]
    got = logits_over(model_dir, precision, ids)[len(prompt) - 1 : -1]
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    error = (got - want).abs() / want.std(dim=-1, keepdim=True)
    free = list(generate([load_stage(model_dir, precision=precision)], prompt, new_tokens))
    same = [a == b for a, b in zip(free, continuation, strict=False)]  # free may stop early
    prefix = same.index(False) if False in same else len(same)
    return Accuracy(
        precision=precision.name,
        positions=len(continuation),
        greedy_agreement=round(float(agree), 4),
        greedy_prefix=prefix,
        logit_error_max=round(float(error.max()), 4),
        logit_error_mean=round(float(error.mean()), 5),
    )
