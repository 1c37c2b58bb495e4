"""Choosing the next token from logits, apart from any forward pass.

The generator is explicit so a request's randomness is a value that can be checkpointed
(`generator.get_state()`) and restored on another node, giving the same tokens.
"""

from __future__ import annotations

import torch

from butterfly.types.tasks import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities [V] a sampled (non-greedy) request draws its next token from,
    after temperature, top-k and top-p: what `sample` draws from, and what speculative
    decoding's acceptance rule weighs a draft token by (dataplane.speculate)."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick one token id from `logits` [V] (the last position's)."""
    if params.greedy:
        return int(torch.argmax(logits.float()).item())
    probs = distribution(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator).item())
