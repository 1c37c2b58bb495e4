"""Generation over a pipeline of stages held in this process.

The distributed runtime drives the same stage steps over the network; this loop is the
reference it is compared with, and what `butterfly generate` runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.sampling import make_generator, sample
from butterfly.runtime.stage import Stage, check_positions
from butterfly.types.errors import InvalidInput
from butterfly.types.tasks import SamplingParams

GREEDY = SamplingParams()


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)


def run_pipeline(
    stages: Sequence[Stage],
    caches: Sequence[KVCache | None],
    x: torch.Tensor,
    start_pos: int,
    *,
    last_only: bool = True,
) -> torch.Tensor:
    h = x
    for stage, cache in zip(stages, caches, strict=True):
        h = stage.forward(h, cache, start_pos, last_only=last_only)
    return h


def generate(
    stages: Sequence[Stage],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
    timings: Timings | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids, stopping after a stop id."""
    if not prompt_ids:
        raise InvalidInput("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise InvalidInput(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_positions(0, len(prompt_ids) + max_new_tokens - 1, stages[0].max_context)
    caches = [s.new_cache() for s in stages]
    rng = make_generator(sampling)
    x = torch.tensor([list(prompt_ids)], dtype=torch.int64)
    pos, out = 0, list[int]()
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            logits = run_pipeline(stages, caches, x, pos)
            token = sample(logits[0, -1], sampling, rng, out)
            out.append(token)
            if timings is not None:
                elapsed = time.perf_counter() - t0
                if pos == 0:
                    timings.prefill_s = elapsed
                else:
                    timings.decode_s.append(elapsed)
            yield token
            if token in stop_ids:
                return
            pos += x.shape[1]
            x = torch.tensor([[token]], dtype=torch.int64)
