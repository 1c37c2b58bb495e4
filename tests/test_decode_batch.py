"""Decode rows of different cache lengths share one attention call (keys padded to the
longest and masked); every row must get what it gets alone, to 1e-5."""

from __future__ import annotations

from pathlib import Path

import torch

from butterfly.runtime.loader import load_stage, num_layers
from butterfly.types.model import LayerRange

PROMPTS = [[5, 9, 2, 7, 1], [3, 8], [12, 13, 14, 15, 16, 17, 18, 19, 20], [4, 4, 4, 4, 4]]
NEXT = [30, 31, 32, 33]


def test_batched_decode_rows_of_different_lengths_match_each_row_alone(
    tiny_model: Path,
) -> None:
    stage = load_stage(tiny_model, LayerRange(0, num_layers(tiny_model)))
    alone, together = [], []
    for prompt in PROMPTS:
        for caches in (alone, together):
            cache = stage.new_cache()
            stage.forward(torch.tensor([prompt]), cache, 0)
            caches.append(cache)
    starts = [len(p) for p in PROMPTS]
    want = [
        stage.forward(torch.tensor([[t]]), c, s)
        for t, c, s in zip(NEXT, alone, starts, strict=True)
    ]
    got = stage.forward_rows(torch.tensor([[t] for t in NEXT]), together, starts)  # type: ignore[attr-defined]
    for b, w in enumerate(want):
        torch.testing.assert_close(got[b : b + 1], w, atol=1e-5, rtol=0)
    # the caches advanced alike: a second batched step still matches
    starts2 = [s + 1 for s in starts]
    want2 = [stage.forward(torch.tensor([[7]]), c, s) for c, s in zip(alone, starts2, strict=True)]
    got2 = stage.forward_rows(torch.tensor([[7]] * len(PROMPTS)), together, starts2)  # type: ignore[attr-defined]
    for b, w in enumerate(want2):
        torch.testing.assert_close(got2[b : b + 1], w, atol=1e-5, rtol=0)
    # rows of equal length take the unmasked path (prompts 0 and 3 hold 7 positions now)
    want3 = [stage.forward(torch.tensor([[9]]), alone[i], 7) for i in (0, 3)]
    got3 = stage.forward_rows(torch.tensor([[9], [9]]), [together[0], together[3]], [7, 7])  # type: ignore[attr-defined]
    for b, w in enumerate(want3):
        torch.testing.assert_close(got3[b : b + 1], w, atol=1e-5, rtol=0)
