"""Draft tokens from a small model on the gateway (generation.speculative.mode "draft").

Prompt lookup (`schedule.drafts`) drafts only where a text repeats itself. A small model of
the same vocabulary guesses the next tokens of any text; one traversal of the pipeline
then verifies them exactly as it verifies a lookup's draft (`dataplane.speculate`).

A greedy request's draft is the small model's greedy continuation, a function of the token
history alone; greedy output is plain decoding's whatever the small model guesses. A
sampled request's draft is drawn from the small model's own distribution q at the
request's sampling settings (temperature, top-k, top-p, penalties), and the acceptance
rule keeps each token with probability min(1, p / q) (`speculate.confirm`): a small model
close to the served one has nearly all of its draft kept. The draws come from a generator
seeded from the request's RNG state and the history's length (`draft_seed`), which they
do not advance: a resumed request drafts the same tokens, up to the small model's
numerics. Taking the draft as a point mass instead, as prompt lookup's is, kept a token
with probability p(x) only: the served model drafting for itself at temperature 1 kept
about 1 in 80 of its draft tokens (bench/speculative.py, k = 4, AMD EPYC).

A draft is worth its traversal only where the small model is likely to be right. A greedy
request drafts while the small model guessed at least `MIN_HITS` of the history's last
`RECENT` tokens. A sampled request is gated by the gateway on what the pipeline kept of
its drafts (`schedule.drafts.Acceptance`), before it asks for one.

Each request keeps its own cache of the small model, cut back at each call to the
longest prefix it shares with the history: the last traversal's rejected draft tokens lie
past that prefix. A call then computes only the tokens confirmed since the last one
(which also says how well the small model has been guessing this text) and k - 1 decode
steps. At most `max_requests` caches are kept; the least recently used is dropped, and
rebuilt from the history if its request drafts again.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.loader import load_stage, model_args
from butterfly.runtime.precision import FP32, Precision
from butterfly.runtime.sampling import biased, distribution, greedy_token, is_greedy
from butterfly.runtime.stage import Stage
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.errors import ButterflyError, ConfigError
from butterfly.types.tasks import SamplingParams

log = logging.getLogger(__name__)

MAX_REQUESTS = 64
RECENT = 16
MIN_HITS = 4
"""No draft while the small model guessed fewer than `MIN_HITS` of the history's last
`RECENT` tokens (its greedy choice from the tokens before each): a draft it is unlikely to
get right costs k of its decode steps and a longer traversal for nothing. On the demo
model, its own first 2 layers guessed none of 288 of its tokens and drafted at 0.72x plain
decoding's tokens/s (bench/speculative.py, k = 4, 5 ms links, AMD EPYC); the guesses are a function
of the history (up to the numerics of a cache rebuilt in one pass), so a resumed request
drafts as it would have. A history of `RECENT` tokens or fewer always drafts."""


@dataclass(frozen=True)
class Draft:
    """Draft tokens, and for a sampled request the distributions [len(tokens), V] they
    were drawn from (None: greedy, each token a point mass)."""

    tokens: tuple[int, ...] = ()
    q: torch.Tensor | None = None


@dataclass
class _Held:
    """A request's cache of the small model, the tokens it holds and the small model's
    guess for each from the ones before (none for the first; one more, for the next
    token)."""

    cache: KVCache
    cached: list[int] = field(default_factory=list)
    guesses: list[int] = field(default_factory=lambda: [-1])


def draft_seed(rng_state: bytes, length: int) -> int:
    """The seed of a sampled draft's draws: a function of the request's RNG state (which
    the draft does not advance) and its history's length, so a step retried, or resumed
    from a checkpoint, draws the same draft."""
    digest = hashlib.blake2b(rng_state + length.to_bytes(8, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def check_draft_model(draft_dir: Path, model_dir: Path) -> None:
    """Refuse (ConfigError) a draft model that cannot draft for the served one: no
    checkpoint there, a family that does not generate, or another vocabulary size (its
    token ids would not be the served model's)."""
    where = "generation.speculative.draft_model"
    try:
        family, args = model_args(draft_dir)
    except (ButterflyError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{where} {str(draft_dir)!r} is not a model checkpoint: {e}") from e
    if not family.generates:
        raise ConfigError(f"{where}: {family.name} models do not generate text")
    served_family, served_args = model_args(model_dir)
    if not served_family.generates:
        raise ConfigError(f"{where}: the served {served_family.name} model does not generate")
    served = int(getattr(served_args, "vocab_size", 0))
    vocab = int(getattr(args, "vocab_size", 0))
    if vocab != served:
        raise ConfigError(
            f"{where} has a vocabulary of {vocab} tokens, the served model {served}: "
            "a draft model must share the served model's tokenizer"
        )


class ModelDrafter:
    """The small model, loaded on the node's torch thread when the engine starts serving
    (`warm`) or on first use, and each request's cache of it."""

    def __init__(
        self,
        draft_dir: Path,
        torch_thread: TorchThread,
        precision: Precision = FP32,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self._dir, self._torch, self._precision = draft_dir, torch_thread, precision
        self._max_requests = max_requests
        self._stage: Stage | None = None
        self.failed = ""
        """Why the checkpoint could not be loaded, once it could not: no more drafts."""
        self._held: OrderedDict[str, _Held] = OrderedDict()

    async def propose(
        self,
        request_id: str,
        tokens: Sequence[int],
        k: int,
        sampling: SamplingParams | None = None,
        *,
        generated: int = 0,
        seed: int = 0,
    ) -> Draft:
        """Up to `k` tokens the small model writes after `tokens`: its greedy choices (its
        logits adjusted as the request's are: logit bias, penalties), or for a sampled
        request (`sampling` not greedy) draws from its distributions at those settings,
        seeded with `seed`, the last `generated` tokens of the history counting for the
        penalties. An empty draft for k <= 0, an empty history, no room
        left in the small model's context, a greedy request's text the small model has not
        been guessing (`MIN_HITS`), or a small model that fails (logged: a checkpoint that
        will not load stops drafting until restart)."""
        if self.failed:
            return Draft()
        history = list(tokens)
        # a request's first draft reads its whole history: never inline on the event
        # loop's thread (TorchThread.run), where the short catch-ups after it may run
        kind = "draft" if request_id in self._held else None
        try:
            return await self._torch.run(
                lambda: self.propose_now(request_id, history, k, sampling, generated, seed),
                kind,
            )
        except Exception as e:  # an accelerator only: the request decodes without it
            if self._stage is None:  # the checkpoint would not load: not again
                self._give_up(e)
            else:
                log.warning(
                    "drafting for %s failed (%s: %s); this step goes undrafted",
                    request_id,
                    type(e).__name__,
                    e,
                )
                self.drop(request_id)
            return Draft()

    async def warm(self) -> None:
        """Load the small model now, on the torch thread, so the first draft does not
        hold the node's stage steps while it loads; a failure is logged, as `propose`'s."""
        if self._stage is not None or self.failed:
            return
        try:
            await self._torch.run(self._load)
        except Exception as e:
            self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}"
        log.error(
            "the draft model in %s cannot be loaded (%s); decoding without drafts until restart",
            self._dir,
            self.failed,
        )

    def propose_now(
        self,
        request_id: str,
        tokens: Sequence[int],
        k: int,
        sampling: SamplingParams | None = None,
        generated: int = 0,
        seed: int = 0,
    ) -> Draft:
        """`propose` on the calling thread (the torch thread's own work)."""
        stage = self._load()
        k = min(k, stage.max_context - len(tokens))
        if k <= 0 or not tokens:
            return Draft()
        held = self._cache_of(request_id, stage)
        cache, cached, guesses = held.cache, held.cached, held.guesses
        common = 0
        limit = min(len(cached), len(tokens) - 1)  # one token at least to read logits from
        while common < limit and cached[common] == tokens[common]:
            common += 1
        cache.truncate(common)
        del cached[common:]
        del guesses[common + 1 :]
        n = len(tokens)
        sampled = sampling is not None and not is_greedy(sampling)
        with torch.inference_mode():
            feed = list(tokens[common:])
            # only the last RECENT guesses are read: a long feed (a first draft, a whole
            # prompt) takes logits for its tail alone, not a [positions, vocabulary] block
            split = max(0, len(feed) - (RECENT + 1))
            if split:
                stage.forward(torch.tensor([feed[:split]]), cache, common, last_only=True)
                cached.extend(feed[:split])
                guesses.extend([-1] * split)  # never read: older than the window
            tail = feed[split:]
            logits = stage.forward(torch.tensor([tail]), cache, len(cached), last_only=False)[0]
            cached.extend(tail)
            # guessed as the request chooses: with its logit bias (penalties left out,
            # which change from position to position); raw guesses missed every token a
            # bias moved, and drafting stopped (a review)
            request = sampling or SamplingParams()
            guesses.extend(int(g) for g in biased(logits, request).argmax(-1).tolist())
            recent = range(max(1, n - RECENT), n)
            judged = not sampled and len(recent) == RECENT  # sampled: Acceptance gates it
            if judged and sum(guesses[j] == tokens[j] for j in recent) < MIN_HITS:
                return Draft()  # the small model has not been predicting this text
            row = logits[-1]
            drafted: list[int] = []
            rows: list[torch.Tensor] = []
            draws = torch.Generator().manual_seed(seed) if sampled else None
            before = list(tokens[n - generated :]) if generated else []
            for i in range(k):
                if sampling is not None and draws is not None:
                    q = distribution(row, sampling, [*before, *drafted])
                    token = int(torch.multinomial(q, 1, generator=draws).item())
                    rows.append(q)
                elif sampling is not None:  # what the target's greedy choice will weigh
                    token = greedy_token(row, sampling, [*before, *drafted])
                else:
                    token = int(row.argmax())
                drafted.append(token)
                if i + 1 < k:
                    row = stage.forward(torch.tensor([[token]]), cache, len(cached))[0, -1]
                    cached.append(token)
                    guesses.append(int(biased(row, request).argmax()))
        return Draft(tuple(drafted), torch.stack(rows) if rows else None)

    async def release(self, request_id: str) -> None:
        """Drop a finished request's cache, after any draft of it still queued or running
        on the torch thread (which would otherwise make it again)."""
        await self._torch.run(lambda: self.drop(request_id))

    def drop(self, request_id: str) -> None:
        """Drop a request's cache now (on the torch thread, or with none of its drafts
        running)."""
        self._held.pop(request_id, None)

    @property
    def loaded(self) -> bool:
        return self._stage is not None

    def held(self) -> int:
        """Requests whose cache is kept."""
        return len(self._held)

    def _load(self) -> Stage:
        if self._stage is None:
            self._stage = load_stage(self._dir, precision=self._precision, progress=False)
        return self._stage

    def _cache_of(self, request_id: str, stage: Stage) -> _Held:
        """The request's cache and what goes with it, created on its first draft."""
        held = self._held.get(request_id)
        if held is None:
            cache = stage.new_cache()
            if cache is None:
                raise ConfigError("the draft model keeps no cache: it cannot draft")
            held = self._held[request_id] = _Held(cache)
            while len(self._held) > self._max_requests:
                self._held.popitem(last=False)
        self._held.move_to_end(request_id)
        return held


__all__ = [
    "MAX_REQUESTS",
    "MIN_HITS",
    "RECENT",
    "Draft",
    "ModelDrafter",
    "check_draft_model",
    "draft_seed",
]
