"""Choosing the next token from logits, apart from any forward pass.

The generator is explicit so a request's randomness is a value that can be checkpointed
(`generator.get_state()`) and restored on another node, giving the same tokens. Penalties
are a function of the tokens generated so far, which the checkpoint also holds (the logit
bias is one of the task's settings), so a resumed generation adjusts the logits exactly as
the uninterrupted one did; logprobs are read off the logits without touching the
generator, so asking for them changes no token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from butterfly.types.errors import InvalidInput
from butterfly.types.tasks import Sampled, SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


MIN_TEMPERATURE = 1e-4
"""Below this, sampling is greedy: dividing logits by a temperature near 0 overflows to
infinity (1e-300 did, and the draw failed on NaN probabilities), and at 1e-4 a logit gap
of 0.01 is already a factor e^100, so the draw is an argmax anyway."""


def adjust(logits: torch.Tensor, params: SamplingParams, history: Sequence[int]) -> torch.Tensor:
    """The logits a choice is made from: OpenAI's logit bias added, then its presence
    and frequency penalties over the tokens generated so far subtracted. Every choice
    goes through here (`sample`, `greedy_token`, `distribution`), and so does the audit's
    check of the tokens chosen (dataplane.chosen.Chosen): an honest gateway's biased
    token is what the audit expects."""
    logits = biased(logits, params)
    if not history or not params.penalized:
        return logits
    counts = torch.bincount(torch.tensor(history, dtype=torch.int64), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def biased(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`logits` (any rows, vocabulary last) with OpenAI's logit bias added: the same at
    every position, unlike the penalties."""
    if not params.logit_bias:
        return logits
    width = logits.shape[-1]
    ids = [token for token, _ in params.logit_bias]
    if ids[-1] >= width:
        raise InvalidInput(f"logit_bias names token {ids[-1]}; the model has {width} tokens")
    bias = torch.zeros(width, dtype=logits.dtype)
    bias[ids] = torch.tensor([value for _, value in params.logit_bias], dtype=logits.dtype)
    return logits + bias


def is_greedy(params: SamplingParams) -> bool:
    return params.greedy or params.temperature < MIN_TEMPERATURE


def choose(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
) -> tuple[Sampled, float]:
    """`draw` with the chosen token's logprob and the `params.logprobs` likeliest."""
    logits = logits.float()
    token, drawn = draw(logits, params, generator, history)
    logprobs = log_softmax(logits)
    k = min(params.logprobs or 0, logits.shape[-1])
    top = torch.topk(logprobs, k) if k else None
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else ()
    return Sampled(token, float(logprobs[token]), alternatives), drawn


class PromptScores:
    """A prompt's tokens `first`..T-1 scored as the steps holding them come back: which
    rows a step must answer (the positions it holds up to the last to score) and what
    they say. A replay after a lost step scores again what it recomputes; nothing is
    scored twice once the prompt is done. `first` > 1: a history whose earlier tokens
    need no score (a request resumed from a dead gateway's checkpoint scores the tokens
    it had made, from its prompt on, as the dead gateway scored them when it drew them)."""

    def __init__(self, prompt: Sequence[int], k: int, first: int = 1) -> None:
        self.prompt, self.k, self.first = prompt, k, max(1, first)
        self._scores: dict[int, Sampled] = {}  # position p >= first -> its token's

    def wanted(self, start: int, length: int) -> int:
        """How many rows from `start` of a step of `length` positions it must answer for
        tokens still to score (position p's logits score token p + 1); 0 once every one
        is scored, or when the step holds none of their rows."""
        if len(self._scores) >= len(self.prompt) - self.first:
            return 0
        end = min(start + length, len(self.prompt) - 1)
        return end - start if end > max(start, self.first - 1) else 0

    def add(self, start: int, logits: torch.Tensor) -> None:
        """`logits` [rows, V]: a step's first rows, positions from `start`; only the
        rows of tokens from `first` on are scored (a log-softmax over the vocabulary
        each)."""
        skip = max(0, self.first - 1 - start)
        rows = logits[skip:]
        at = start + skip + 1
        targets = self.prompt[at : at + rows.shape[0]]
        if not targets:
            return
        for p, s in enumerate(scored(rows[: len(targets)], targets, self.k), start=at):
            self._scores[p] = s

    def scores(self) -> tuple[Sampled, ...]:
        return tuple(
            self._scores[p] for p in range(self.first, len(self.prompt)) if p in self._scores
        )


def scored(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[Sampled]:
    """Each row's `targets` token with its logprob and the `k` likeliest there: `logits`
    [T, V] of positions 0..T-1 score the tokens that followed them (a prompt's logprobs,
    as `choose` scores a sampled token: the log-softmax, before any penalty)."""
    logprobs = log_softmax(logits.float())
    chosen = logprobs.gather(1, torch.tensor(list(targets), dtype=torch.int64)[:, None])[:, 0]
    k = min(k, logits.shape[-1])
    top = torch.topk(logprobs, k) if k else None
    out = []
    for row, (token, value) in enumerate(zip(targets, chosen.tolist(), strict=True)):
        alternatives = (
            tuple(zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True))
            if top is not None
            else ()
        )
        out.append(Sampled(token, float(value), alternatives))
    return out


LEAST_LOGPROB = -9999.0
"""The logprob reported for a token whose logit is -inf or NaN: JSON has no -inf, and
a response holding one failed to serialize (OpenAI reports -9999 for such tokens)."""


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The logprobs reported for `logits` (rows, vocabulary last): the log-softmax, each
    at least `LEAST_LOGPROB` and never NaN, whatever the last stage sent (a liar's
    non-finite logits are the audit's to judge; the response must still be JSON)."""
    out = torch.log_softmax(logits, dim=-1)
    return out.nan_to_num(nan=LEAST_LOGPROB).clamp(min=LEAST_LOGPROB)


def usable(logits: torch.Tensor) -> torch.Tensor:
    """`logits` a draw can be made from: NaN as -inf (never drawn), +inf as a finite
    value above every other (softmax's limit: the +inf ones share the draw), and all
    of them equal where none is left. A last stage's non-finite logits made the draw
    raise, and the accepted request failed before its audit could convict the liar
    (a review); the draw now goes on, and the audit judges the logits."""
    if bool(torch.isfinite(logits).all()):
        return logits
    out = logits.nan_to_num(nan=float("-inf"), posinf=1e30)
    return out if bool(torch.isfinite(out).any()) else torch.zeros_like(out)


def distribution(
    logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = ()
) -> torch.Tensor:
    """The probabilities [V] a sampled (non-greedy) request draws its next token from,
    after penalties, temperature, top-k and top-p: what `sample` draws from, and what
    speculative decoding's acceptance rule weighs a draft token by (dataplane.speculate)."""
    logits = usable(adjust(logits.float(), params, history)) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        # the likeliest token always stays (a nucleus of at least one): a top_p below
        # float32's smallest value compares as 0 and dropped every token, and the draw
        # from all -inf raised in an accepted task (a 500, a review)
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def greedy_token(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = ()) -> int:
    """The first of the largest adjusted logits (NaN counting as largest), as
    `torch.argmax` picks it; taken by numpy over the tensor's memory, one torch call
    where argmax and `item` were two more: a gateway picks every greedy token, and
    greedy_token was 2.2% of its samples under bench/api.py (Intel Xeon)."""
    wide = logits if logits.dtype == torch.float32 else logits.float()
    return int(adjust(wide, params, history).numpy().argmax())


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
) -> int:
    """Pick one token id from `logits` [V] (the last position's); `history`: the tokens
    generated so far, which the penalties count."""
    return draw(logits, params, generator, history)[0]


def draw(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
) -> tuple[int, float]:
    """`sample`, and the probability `distribution` gave the token (1.0 when greedy):
    the gateway keeps it, and its audit holds it to the re-executed logits
    (`dataplane.chosen.Chosen`), which a last stage reshaping the logits its
    fingerprint does not pin would otherwise pass (a review)."""
    if is_greedy(params):
        return greedy_token(logits, params, history), 1.0
    probs = distribution(logits, params, history)
    token = int(torch.multinomial(probs, 1, generator=generator).item())
    return token, float(probs[token])
