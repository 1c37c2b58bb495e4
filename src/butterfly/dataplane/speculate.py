"""Speculative decoding: which drafted tokens one traversal of the pipeline confirms.

Every token costs a traversal of the whole chain, and on real links each hop's latency
is paid once per token per stage. With a draft of k tokens (`schedule.drafts`), the
gateway sends the last token and the draft as ONE step of k + 1 positions; the last
stage returns logits for all of them, and row i is the model's distribution after input
i. The tokens kept are the draft's longest confirmed prefix plus one more (the model's
own choice where it first disagreed, or after the whole draft): a traversal yields 1 to
k + 1 tokens, never fewer than plain decoding.

The stages' KV caches then hold the rejected positions too. They are rolled back by the
next step itself: its `start` is the first rejected position, and every stage cuts its
cache back to a step's start before computing it (`KvTable.cache_for`, the rule a
replay after recovery already relies on), so the rollback costs no message of its own.

Greedy requests keep exactly the tokens plain decoding gives: a draft token is kept only
where it is the argmax. Sampled requests keep the target distribution with the
speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023): a draft token x drawn
from q is kept with probability min(1, p(x) / q(x)), otherwise the token is drawn from the
residual max(p - q, 0) normalised. A draft model's sampled draft brings its own q
(`dataplane.drafter`); a prompt lookup's draft is a point mass q = 1{x}, for which the
rule keeps x with probability p(x) and otherwise draws from p with x removed. The rule's
draws come from the request's own generator, so the checkpoint (token history and RNG
state) resumes a request exactly where its drafts are the same (always with prompt
lookup; a draft model's draws are seeded from that state, `drafter.draft_seed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from butterfly.runtime.sampling import distribution, draw, greedy_token, is_greedy
from butterfly.types.tasks import SamplingParams


def confirm(
    logits: torch.Tensor,
    drafted: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
    q: torch.Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """The tokens a verify step yields, and the probability each one's row gave it (1.0
    when greedy, as `sampling.draw` reports a plain step's: `Generation.drawn`):
    `logits` [len(drafted) + 1, V] are the rows after the last token and after each
    draft token; 1 to len(drafted) + 1 tokens come back. `history`: the tokens
    generated before this step; row i's penalties also count the i tokens accepted
    before it, as plain decoding would have. `q` [len(drafted), V]: the distributions
    the draft tokens were drawn from, for a sampled request (None: each draft token is
    a point mass)."""
    if logits.shape[0] != len(drafted) + 1:
        raise ValueError(f"{logits.shape[0]} rows of logits for a draft of {len(drafted)}")
    if q is not None and tuple(q.shape) != (len(drafted), logits.shape[-1]):
        raise ValueError(f"draft distributions {tuple(q.shape)} for a draft of {len(drafted)}")
    out: list[int] = []
    probs: list[float] = []
    for i, (row, token) in enumerate(zip(logits, drafted, strict=False)):
        seen = [*history, *out]
        if is_greedy(params):
            chosen = greedy_token(row, params, seen)
            out.append(chosen)
            probs.append(1.0)
            if chosen != token:
                return out, probs
            continue
        p = distribution(row, params, seen)
        drawn_from = q[i].float() if q is not None else None
        chance = float(p[token]) if drawn_from is None else float(p[token] / drawn_from[token])
        if float(torch.rand((), generator=generator)) < chance:
            out.append(token)
            probs.append(float(p[token]))
            continue
        if drawn_from is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - drawn_from).clamp_(min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p is q (or the point mass on the draft): never rejected
            out.append(token)
            probs.append(float(p[token]))
            continue
        chosen = int(torch.multinomial(residual / total, 1, generator=generator).item())
        out.append(chosen)
        probs.append(float(p[chosen]))
        return out, probs
    token, drawn = draw(logits[-1], params, generator, [*history, *out])
    return [*out, token], [*probs, drawn]


def kept_until_stop(tokens: Sequence[int], stop: frozenset[int]) -> list[int]:
    """`tokens` up to and including the first stop token: a generation ends there, and
    what the draft confirmed after it was never produced."""
    for i, token in enumerate(tokens):
        if token in stop:
            return list(tokens[: i + 1])
    return list(tokens)


__all__ = ["confirm", "kept_until_stop"]
