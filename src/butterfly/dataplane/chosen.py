"""The tokens a request's gateway chose, and what it reported of the logits it chose
them from, held to the last stage's re-executed logits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from butterfly.protocol.proof import Tolerance
from butterfly.runtime.sampling import adjust, distribution, is_greedy
from butterfly.types.tasks import Sampled, SamplingParams

UNLIKELY = 1e-9
"""A chosen token the re-executed distribution gives less than this, even with every
honest logit moved its way by the tolerance, was not drawn from honest logits."""
SLACK = 1e-5
"""Float noise beside the tolerance, relative, in a probability or a logprob the
gateway and the audit compute from the same logits in different orders."""


@dataclass(frozen=True)
class Chosen:
    """The tokens a request's gateway chose, to be held to the last stage's re-execution:
    a fingerprint names a stage's largest outputs only, and where the largest logits by
    magnitude are negative, a last stage could raise another logit above the honest best
    without changing them (its fingerprint then matched and the wrong token was marked
    verified). A greedy token must be the re-executed best; a sampled one must not be
    one the honest distribution all but never draws.

    What else the answer took from those logits is held to them too: a sampled token's
    probability under the distribution it was drawn from (`drawn`), and the logprobs
    reported (`logprobs`, `prompt_logprobs`: the chosen or prompt token's and the
    likeliest alternatives'). A last stage that kept its fingerprinted values and
    reshaped every other logit had its answers verified with logprobs 1.7 off and
    samples drawn from its own distribution (a review)."""

    params: SamplingParams
    prompt: int  # tokens before the first chosen one
    tokens: tuple[int, ...]
    # the positions whose token this audit judges (None: all): a plan's audit judges
    # those its steps computed; a token chosen under a later plan, from a liar's logits
    # there, left the earlier plan unverified, and the liar's own plan with it
    positions: frozenset[int] | None = None
    drawn: Mapping[int, float] = field(default_factory=dict)  # token index -> probability
    logprobs: Sequence[Sampled] = ()  # of the chosen tokens, in order
    prompt_logprobs: Sequence[Sampled] = ()  # of the prompt's tokens 1, 2, ...
    # the first tokens, taken from a dead gateway's checkpoint: chosen from logits this
    # gateway never had, so no record of its steps led to them (an honest last stage
    # whose record of the resuming prefill covered their rows was convicted for them)
    inherited: int = 0

    def chosen_here(self, p: int) -> bool:
        """Whether the token that position `p`'s logits are judged for was chosen from
        this gateway's steps, whose records then answer for it."""
        return not self.prompt - 1 <= p < self.prompt - 1 + self.inherited

    @property
    def first_row(self) -> int:
        """The first position whose logits the answer used."""
        return 0 if self.prompt_logprobs else max(0, self.prompt - 1)

    def wrong(
        self, out: torch.Tensor, offset: int, tol: Tolerance, *, answered: bool = False
    ) -> list[int]:
        """The positions whose chosen token, or what was reported of it, `out`'s logits
        (rows of positions from `offset` on) do not allow: an honest last stage's logits
        each lie within one tolerance of the re-execution's, so a greedy token may trail
        the best by two, a sampled one is judged with every logit moved its way by one,
        and a probability or logprob is judged between the re-execution's with every
        logit moved for and against it by one. `answered`: only what a record of this
        gateway's steps answers for, which leaves out the choice of a token a dead
        gateway made (`inherited`), not the logprob reported of it (scored here, from
        the resuming prefill's rows)."""
        wrong = []
        for j, token in enumerate(self.tokens):
            p = self.prompt - 1 + j
            row = self._row(out, offset, p)
            if row is None:
                continue
            made_here = not answered or self.chosen_here(p)
            if not 0 <= token < row.shape[0]:
                if made_here:
                    wrong.append(p)
                continue
            margin = honest_margin(row, tol)
            history = self.tokens[:j]
            if is_greedy(self.params):
                logits = adjust(row, self.params, history)
                chosen_ok = float(logits[token]) >= float(logits.max()) - 2 * margin
            else:
                chosen_ok = self._drawable(row, token, history, margin, self.drawn.get(j))
            reported = self._reported(j, token)
            if (not chosen_ok and made_here) or (
                reported is not None and not _reports(row, reported, margin)
            ):
                wrong.append(p)
        for i, scored in enumerate(self.prompt_logprobs):  # row p scores the token after it
            row = self._row(out, offset, i)
            if row is not None and not _reports(row, scored, honest_margin(row, tol)):
                wrong.append(i)
        return sorted(wrong)

    def _reported(self, j: int, token: int) -> Sampled | None:
        """What was reported of chosen token `j`, if anything: the logprobs are of the
        last tokens (a request resumed from a dead gateway's checkpoint reports those
        made after it only, and pairing them from the first convicted nobody but left
        it unverified: a review); one of another token is not this one's."""
        k = j - (len(self.tokens) - len(self.logprobs))
        if k < 0:
            return None
        reported = self.logprobs[k]
        return reported if reported.token == token else None

    def _row(self, out: torch.Tensor, offset: int, p: int) -> torch.Tensor | None:
        """Position `p`'s re-executed logits, if this audit holds them and judges `p`."""
        if p < offset or p - offset >= out.shape[1]:
            return None
        if self.positions is not None and p not in self.positions:
            return None
        return out[0, p - offset].float()

    def _drawn_bounds(
        self, row: torch.Tensor, token: int, history: Sequence[int], margin: float
    ) -> tuple[float, float]:
        """The probability honest logits give `token`, at least and at most."""
        favoured = row - margin
        favoured[token] = row[token] + margin
        against = row + margin
        against[token] = row[token] - margin
        low = float(distribution(against, self.params, history)[token])
        high = float(distribution(favoured, self.params, history)[token])
        return low, high

    def _drawable(
        self,
        row: torch.Tensor,
        token: int,
        history: Sequence[int],
        margin: float,
        drawn: float | None,
    ) -> bool:
        low, high = self._drawn_bounds(row, token, history, margin)
        if high < UNLIKELY:
            return False
        if drawn is None:  # not kept (a token a dead gateway chose, from its checkpoint)
            return True
        if not kept_set_stable(row, self.params, history, margin):
            return True  # honest logits near a cut: the bounds above are none
        return low * (1 - SLACK) - SLACK * 1e-3 <= drawn <= high * (1 + SLACK) + SLACK * 1e-3


def honest_margin(row: torch.Tensor, tol: Tolerance) -> float:
    """How far an honest logit may lie from the re-execution's."""
    return tol.atol + (tol.rtol + tol.scaled) * float(row.abs().nan_to_num(0.0).max())


def _reports(row: torch.Tensor, scored: Sampled, margin: float) -> bool:
    """Whether `scored` (a token's logprob and the likeliest alternatives, the
    log-softmax of the logits) is what honest logits give: each value within twice the
    margin (the logit and the normalizer each move by one), and no token left out of the
    alternatives clearly likelier than the least likely named."""
    logprobs = torch.log_softmax(row, dim=-1)
    width = logprobs.shape[0]
    bound = 2 * margin

    def close(token: int, value: float) -> bool:
        if not 0 <= token < width:
            return False
        honest = float(logprobs[token])
        return abs(value - honest) <= bound + SLACK * (1 + abs(honest))

    if not close(scored.token, scored.logprob):
        return False
    if not all(close(t, v) for t, v in scored.top):
        return False
    if not scored.top:
        return True
    named = torch.zeros(width, dtype=torch.bool)
    named[[t for t, _ in scored.top]] = True
    least = min(v for _, v in scored.top)
    return not bool(((logprobs > least + 2 * bound + SLACK) & ~named).any())


def kept_set_stable(
    row: torch.Tensor, params: SamplingParams, history: Sequence[int], margin: float
) -> bool:
    """Whether every row within `margin` of `row` keeps the same tokens through top-k
    and top-p, so that moving every logit for or against a token bounds its
    probability. Near a cut it does not: a token honest noise moves across the k-th
    value or the nucleus's edge is kept on one side and not the other, and an honest
    bfloat16 last stage was evicted for a draw outside such "bounds" (a review). Each
    test is held to twice the noise it allows, for the float noise beside it."""
    if not 0 < params.top_k < row.shape[-1] and params.top_p >= 1.0:
        return True
    logits = adjust(row.float(), params, history) / params.temperature
    spread = 2 * margin / params.temperature  # two honest logits may close this gap
    ranked = torch.sort(logits, descending=True).values
    if 0 < params.top_k < ranked.shape[0]:
        if float(ranked[params.top_k - 1] - ranked[params.top_k]) <= 2 * spread:
            return False
        ranked = ranked[: params.top_k]
    if params.top_p >= 1.0:
        return True
    probs = torch.softmax(ranked, dim=-1)
    before = (torch.cumsum(probs, dim=-1) - probs).tolist()
    dropped = next((i for i, b in enumerate(before) if b >= params.top_p), None)
    moved = math.exp(2 * spread)  # how far noise moves a probability, or a sum of them
    if before[(dropped or len(before)) - 1] * moved >= params.top_p:
        return False  # the last kept token might be dropped
    if dropped is None:
        return True
    gap = float(ranked[dropped - 1] - ranked[dropped])
    return before[dropped] / moved >= params.top_p and gap > 2 * spread
