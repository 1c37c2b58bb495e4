"""The tokens a request's gateway chose, held to the last stage's re-executed logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from butterfly.protocol.proof import Tolerance
from butterfly.runtime.sampling import adjust, distribution, is_greedy
from butterfly.types.tasks import SamplingParams

UNLIKELY = 1e-9
"""A chosen token the re-executed distribution gives less than this, even with every
honest logit moved its way by the tolerance, was not drawn from honest logits."""


@dataclass(frozen=True)
class Chosen:
    """The tokens a request's gateway chose, to be held to the last stage's re-execution:
    a fingerprint names a stage's largest outputs only, and where the largest logits by
    magnitude are negative, a last stage could raise another logit above the honest best
    without changing them (its fingerprint then matched and the wrong token was marked
    verified). A greedy token must be the re-executed best; a sampled one must not be
    one the honest distribution all but never draws. Within what it may draw, a sampled
    request's liar can still favour one token over another (SECURITY.md)."""

    params: SamplingParams
    prompt: int  # tokens before the first chosen one
    tokens: tuple[int, ...]
    # the positions whose token this audit judges (None: all): a plan's audit judges
    # those its steps computed; a token chosen under a later plan, from a liar's logits
    # there, left the earlier plan unverified, and the liar's own plan with it
    positions: frozenset[int] | None = None

    def wrong(self, out: torch.Tensor, offset: int, tol: Tolerance) -> list[int]:
        """The positions whose chosen token `out`'s logits (rows of positions from
        `offset` on) do not allow: an honest last stage's logits each lie within one
        tolerance of the re-execution's, so a greedy token may trail the best by two, and
        a sampled one is judged with every logit moved its way by one."""
        wrong = []
        for j, token in enumerate(self.tokens):
            p = self.prompt - 1 + j
            if p < offset or p - offset >= out.shape[1]:
                continue
            if self.positions is not None and p not in self.positions:
                continue
            row, history = out[0, p - offset].float(), self.tokens[:j]
            if not 0 <= token < row.shape[0]:
                wrong.append(p)
                continue
            margin = tol.atol + (tol.rtol + tol.scaled) * float(row.abs().nan_to_num(0.0).max())
            if is_greedy(self.params):
                logits = adjust(row, self.params, history)
                if float(logits[token]) < float(logits.max()) - 2 * margin:
                    wrong.append(p)
                continue
            favoured = row - margin
            favoured[token] = row[token] + margin
            if float(distribution(favoured, self.params, history)[token]) < UNLIKELY:
                wrong.append(p)
        return wrong
