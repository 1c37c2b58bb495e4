"""Draft tokens from a small model on the gateway (generation.speculative.mode "draft").

Prompt lookup (`schedule.drafts`) drafts only where a text repeats itself. A small model of
the same vocabulary guesses the next tokens of any text; one traversal of the pipeline
then verifies them exactly as it verifies a lookup's draft (`dataplane.speculate`).

The draft is the small model's greedy continuation, so it is a function of the token
history alone, and the acceptance rule takes it as a point mass (q = 1{x}): a sampled
request keeps the target distribution exactly, and greedy output is plain decoding's
whatever the small model guesses. (The rule with the small model's own distribution
accepts more of a sampled draft, but its draws would depend on that model's numerics;
the point mass keeps a resumed request's draws to its history and RNG state.)

A sampled request keeps a draft token x with probability p(x), the served model's
probability of it at the request's temperature; a draft is worth its traversal only
while that is likely. So at a temperature above 0 the draft stops before the token that
would bring the small model's own odds of the whole draft, the product of its
probabilities at that temperature, under `MIN_ODDS`: on the demo model, sampled at 1,
the served model drafting for itself with no such stop confirmed about 1 in 80 of its
draft tokens and took 2.6 times as long per token (bench/speculative.py, k = 4, AMD EPYC). A greedy
draft always runs to k: only a wrong guess costs, and the small model cannot know which
guesses are.

Each request keeps its own cache of the small model, cut back at each call to the
longest prefix it shares with the history: the last traversal's rejected draft tokens lie
past that prefix. A call then computes only the tokens confirmed since the last one
(which also says how well the small model has been guessing this text, `MIN_HITS`), and
k - 1 decode steps. At most `max_requests` caches are kept; the least recently used is
dropped, and rebuilt from the history if its request drafts again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.loader import load_stage, model_args
from butterfly.runtime.precision import FP32, Precision
from butterfly.runtime.stage import Stage
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.errors import ButterflyError, ConfigError

log = logging.getLogger(__name__)

MAX_REQUESTS = 64
MIN_ODDS = 0.5
"""A sampled request's draft stops before the small model's odds of it fall below this."""
RECENT = 16
MIN_HITS = 4
"""No draft while the small model guessed fewer than `MIN_HITS` of the history's last
`RECENT` tokens (its greedy choice from the tokens before each): a draft it is unlikely to
get right costs k of its decode steps and a longer traversal for nothing. On the demo
model, its own first 2 layers guessed none of 288 of its tokens and drafted at 0.72x plain
decoding's tokens/s (bench/speculative.py, k = 4, 5 ms links, AMD EPYC); the guesses are a function
of the history (up to the numerics of a cache rebuilt in one pass), so a resumed request
drafts as it would have. A history of `RECENT` tokens or fewer always drafts."""


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
        self._held: OrderedDict[str, tuple[KVCache, list[int], list[int]]] = OrderedDict()

    async def propose(
        self, request_id: str, tokens: Sequence[int], k: int, temperature: float = 0.0
    ) -> tuple[int, ...]:
        """Up to `k` tokens the small model writes greedily after `tokens`, fewer at a
        `temperature` above 0 once their odds fall (`MIN_ODDS`); () for k <= 0, an empty
        history, no room left in the small model's context, or a small model that fails
        (logged: a checkpoint that will not load stops drafting until restart)."""
        if self.failed:
            return ()
        history = list(tokens)
        # a request's first draft reads its whole history: never inline on the event
        # loop's thread (TorchThread.run), where the short catch-ups after it may run
        kind = "draft" if request_id in self._held else None
        try:
            return await self._torch.run(
                lambda: self.propose_now(request_id, history, k, temperature), kind
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
            return ()

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
        self, request_id: str, tokens: Sequence[int], k: int, temperature: float = 0.0
    ) -> tuple[int, ...]:
        """`propose` on the calling thread (the torch thread's own work)."""
        stage = self._load()
        k = min(k, stage.max_context - len(tokens))
        if k <= 0 or not tokens:
            return ()
        cache, cached, guesses = self._cache_of(request_id, stage)
        common = 0
        limit = min(len(cached), len(tokens) - 1)  # one token at least to read logits from
        while common < limit and cached[common] == tokens[common]:
            common += 1
        cache.truncate(common)
        del cached[common:]
        del guesses[common + 1 :]
        n = len(tokens)
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
            guesses.extend(int(g) for g in logits.argmax(-1).tolist())
            recent = range(max(1, n - RECENT), n)
            if len(recent) == RECENT and sum(guesses[j] == tokens[j] for j in recent) < MIN_HITS:
                return ()  # the small model has not been predicting this text
            row, drafted, odds = logits[-1], [], 1.0
            for i in range(k):
                token = int(row.argmax())
                if temperature > 0:
                    odds *= float(torch.softmax(row.float() / temperature, -1)[token])
                    if odds < MIN_ODDS:
                        break
                drafted.append(token)
                if i + 1 < k:
                    row = stage.forward(torch.tensor([[token]]), cache, len(cached))[0, -1]
                    cached.append(token)
                    guesses.append(int(row.argmax()))
        return tuple(drafted)

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

    def _cache_of(self, request_id: str, stage: Stage) -> tuple[KVCache, list[int], list[int]]:
        """The request's cache, the tokens it holds, and the small model's guess for each
        of them from the ones before (none for the first; one more, for the next token)."""
        held = self._held.get(request_id)
        if held is None:
            cache = stage.new_cache()
            if cache is None:
                raise ConfigError("the draft model keeps no cache: it cannot draft")
            held = self._held[request_id] = (cache, [], [-1])
            while len(self._held) > self._max_requests:
                self._held.popitem(last=False)
        self._held.move_to_end(request_id)
        return held


__all__ = ["MAX_REQUESTS", "MIN_HITS", "MIN_ODDS", "RECENT", "ModelDrafter", "check_draft_model"]
