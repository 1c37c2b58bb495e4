"""One request's generation as the gateway holds it: the tokens so far, the sampling RNG,
the stop strings, the prompt's scores, and what the next step of the pipeline sends.

The gateway is the canonical keeper of this state (stage nodes keep only KV caches): a
recovery replays from it and a checkpoint saves it. It knows nothing of the network:
`engine.PipelineEngine` sends the steps it asks for, hands each step's logits back here,
and moves it when a plan changes. So it runs in one process with plain tensors as
logits (`tests/test_generation.py`).
"""

from __future__ import annotations

import time

import torch
from tokenizers import Tokenizer

from butterfly.dataplane.drafter import Draft
from butterfly.dataplane.speculate import confirm, kept_until_stop
from butterfly.metrics.events import Emit, PromptChunked, Traversed
from butterfly.runtime.sampling import (
    PromptScores,
    choose,
    draw,
    is_greedy,
    make_generator,
    scored,
)
from butterfly.runtime.stops import TextStops
from butterfly.schedule.drafts import Acceptance
from butterfly.schedule.engine import PromptScored, TokenSink
from butterfly.schedule.store import Checkpoint
from butterfly.types.tasks import InferenceTask, Sampled


class Generation:
    """`pos` is where the stages' caches are valid up to for this request; `pending` the
    tokens from there that the next step must send (the prompt, a replay, or the last
    token)."""

    def __init__(
        self,
        task: InferenceTask,
        on_token: TokenSink,
        eos: frozenset[int],
        emit: Emit,
        tokenizer: Tokenizer | None = None,
        saved: Checkpoint | None = None,
    ) -> None:
        """`saved` (a checkpoint a dead gateway left) starts the request where it was:
        its tokens count as produced and are sent to `on_token` again, its RNG state
        replaces the fresh one. `tokenizer` is needed only for the task's stop strings."""
        self.task, self._on_token, self._eos, self._emit = task, on_token, eos, emit
        self.rng = make_generator(task.sampling)
        self.prompt = list(task.input_ids)
        self.out: list[int] = []
        self.scored: list[Sampled] = []  # with logprobs, when the request asked for them
        # a sampled request's tokens (by index in `out`) -> the probability the target
        # distribution gave each, from the logits it was drawn from: what its audit holds
        # to the re-executed logits (`Chosen`)
        self.drawn: dict[int, float] = {}
        self.wants_logprobs = task.sampling.logprobs is not None
        k = task.sampling.prompt_logprobs  # the prompt's tokens scored (echo with logprobs)
        self.prompt_scores = PromptScores(self.prompt, k) if k is not None else None
        self._stops = (
            TextStops(tokenizer, task.stop, self.prompt) if task.stop and tokenizer else None
        )
        self.acceptance = Acceptance()  # what the pipeline kept of a sampled request's drafts
        self.resumed = saved is not None and len(saved.tokens) <= task.max_new_tokens
        stopped = False
        if saved is not None and self.resumed:
            self.out = list(saved.tokens)
            self.rng.set_state(torch.frombuffer(bytearray(saved.rng_state), dtype=torch.uint8))
            for token in self.out:
                on_token(token)
                stopped = stopped or (self._stops is not None and self._stops.push(token))
        self.inherited = len(self.out)  # chosen by the dead gateway (`Chosen.inherited`)
        self.ended = stopped or (bool(self.out) and self.out[-1] in eos)
        # the logprobs of the tokens a dead gateway made (its checkpoint keeps the tokens
        # only): scored from the rows of the whole-history prefill that resumes the
        # request, as the prompt's are (`to_score`); without them the answer held fewer
        # logprobs than tokens
        self.resumed_scores = (
            PromptScores(self.prompt + self.out, task.sampling.logprobs or 0, len(self.prompt))
            if self.out and self.wants_logprobs
            else None
        )
        self.first_token_at: float | None = None  # perf_counter() at the first token made here
        self.pos = 0
        self._x = torch.tensor([self.prompt + self.out], dtype=torch.int64)
        self._rechecking = False  # `recheck`: the history goes once more, nothing sampled

    def recheck(self) -> None:
        """Send the history once more as a prefill, sampling nothing: a request resumed
        with every token (its checkpoint held them all) computes no step otherwise, and
        with no step's records to read, its audit was skipped: its tokens, chosen by a
        dead gateway from logits nobody checked, came back unverified (a review). The
        last token is left out: one prefill of the rest holds the logits every token
        was chosen from, as the audit re-runs it."""
        self._rechecking = True
        self.replay_from(0)

    def history(self) -> list[int]:
        return self.prompt + self.out

    @property
    def length(self) -> int:
        """Tokens in the history, without building it."""
        return len(self.prompt) + len(self.out)

    @property
    def pending(self) -> int:
        return self._x.shape[1]

    def more(self) -> bool:
        """Whether another step is needed: tokens still asked for, or (max_new_tokens 0,
        an echo that scores its prompt) prompt positions not yet scored."""
        if self._rechecking:
            return True
        if self.ended:
            return False
        scores = self.prompt_scores
        return len(self.out) < self.task.max_new_tokens or (
            scores is not None and scores.wanted(self.pos, self.pending) > 0
        )

    def replay_from(self, pos: int) -> None:
        """The stages' caches hold only `pos` positions (a new plan, a route around a
        node): the next step sends the history from there."""
        end = self.length - 1 if self._rechecking else self.length
        self.pos, self._x = pos, torch.tensor([self.history()[pos:end]], dtype=torch.int64)

    @property
    def drafting(self) -> bool:
        """A decode step verifies a draft, if the text offers one, logprobs asked or not:
        a verify step's rows score the tokens it keeps (`take`). Undrafted when asked,
        a sampled request consumed its generator otherwise than the same request
        without them (the speculative rule's draws), and its seed gave another text (a
        review)."""
        return self.pending == 1 and not self._rechecking

    @property
    def budget(self) -> int:
        """The draft tokens a step may verify: one token comes from the step itself."""
        return self.task.max_new_tokens - len(self.out) - 1

    def step_input(self, limit: int, drafted: tuple[int, ...] = ()) -> torch.Tensor:
        """The tokens of the next step: at most `limit` of the pending ones (a chunk of a
        long input), or the last token and the draft after it."""
        if drafted:
            return torch.cat([self._x, torch.tensor([drafted], dtype=torch.int64)], dim=1)
        return self._x[:, :limit] if limit < self.pending else self._x

    def _scoring(self) -> list[PromptScores]:
        return [s for s in (self.prompt_scores, self.resumed_scores) if s is not None]

    def to_score(self, length: int) -> int:
        """How many of a `length`-position step's rows score positions not scored yet:
        the prompt's (echo with logprobs), or those of the tokens a resumed request made
        before (the step then asks for every row's logits)."""
        return max((s.wanted(self.pos, length) for s in self._scoring()), default=0)

    def score_prompt(self, logits: torch.Tensor, rows: int) -> None:
        """A step's first `rows` rows score prompt positions (or a resumed request's
        earlier tokens); once the prompt's are all scored, the token sink hears of them."""
        if not rows:
            return
        prompt = self.prompt_scores
        completes = prompt is not None and prompt.wanted(self.pos, rows) > 0
        for scores in self._scoring():
            wanted = scores.wanted(self.pos, rows)
            if wanted:
                scores.add(self.pos, logits[0, :wanted])
        if prompt is not None and completes and not prompt.wanted(0, len(self.prompt)):
            self._on_token(PromptScored(prompt.scores()))

    def logprobs(self) -> tuple[Sampled, ...]:
        """Every token's logprobs, when asked: those a resumed request scored again for
        the tokens made before it, then those drawn here."""
        before = self.resumed_scores.scores() if self.resumed_scores is not None else ()
        return (*before, *self.scored)

    def take(self, logits: torch.Tensor, length: int, draft: Draft, drafting: bool) -> list[int]:
        """A step of `length` positions answered with `logits`: move past it, sampling its
        tokens if it ended the input, and return them (none for a chunk of a longer input
        or a prompt only scored). `drafting`: the step could have carried a draft (`draft`
        is what it carried)."""
        drafted = draft.tokens
        if length < self.pending and not drafted:  # a chunk; the rest follows
            self._emit(Traversed())
            self._emit(PromptChunked(length))
            self.pos, self._x = self.pos + length, self._x[:, length:]
            return []
        if self._rechecking:  # the whole history is in the caches again; nothing to draw
            self._rechecking = False
            self.pos, self._x = self.pos + length, self._x[:, length:]
            return []
        if not self.task.max_new_tokens:  # the prompt is scored; no token was asked for
            self.ended = True
            return []
        if self.ended or len(self.out) >= self.task.max_new_tokens:
            # every token is made: the step only scored (a request resumed with every
            # token, whose prompt's logprobs its checkpoint did not hold, scores them
            # again); a token sampled here was one more than max_tokens (a review)
            self.pos, self._x = self.pos + length, self._x[:, length:]
            return []
        sampling = self.task.sampling
        drawn: list[float] = []
        picks: list[Sampled] = []  # the kept tokens' logprobs, when asked
        if drafted:
            got, drawn = confirm(logits[0], drafted, sampling, self.rng, self.out, draft.q)
            self._emit(Traversed(len(drafted), len(got) - 1))
            if draft.q is not None:  # a draft model's draws: its record
                self.acceptance = self.acceptance.verified(len(drafted), len(got) - 1)
        elif self.wants_logprobs:  # a log-softmax over the vocabulary more, only when asked
            picked, p = choose(logits[0, -1], sampling, self.rng, self.out)
            got, drawn, picks = [picked.token], [p], [picked]
            self._emit(Traversed())
        else:
            token, p = draw(logits[0, -1], sampling, self.rng, self.out)
            got, drawn = [token], [p]
            self._emit(Traversed())
        if drafting and not drafted:
            self.acceptance = self.acceptance.undrafted_step()
        got = kept_until_stop(got, self._eos)
        stopped = False
        if self._stops is not None:  # the tokens up to the one that completes a stop string
            for i, token in enumerate(got):
                if self._stops.push(token):
                    got, stopped = got[: i + 1], True
                    break
        if drafted and self.wants_logprobs:  # row i is the distribution token i came from
            picks = scored(logits[0, : len(got)], got, sampling.logprobs or 0)
        if not self.out:  # before the sink hears it, which may take its time
            self.first_token_at = time.perf_counter()
        if not is_greedy(sampling):
            self.drawn.update(enumerate(drawn[: len(got)], start=len(self.out)))
        self.scored += picks
        for i, token in enumerate(got):
            self.out.append(token)
            self._on_token(picks[i] if self.wants_logprobs else token)
        self.ended = stopped or got[-1] in self._eos
        # the positions whose cache is valid: the input's, less the rejected drafts'
        self.pos += self.pending + len(got) - 1
        self._x = torch.full((1, 1), got[-1], dtype=torch.int64)  # no nested list to parse
        return got

    def text_before_stop(self) -> str | None:
        """At the end: the text cut before the stop string that ended it, or None when
        none did (or the task has none)."""
        return self._stops.end() if self._stops is not None else None

    def checkpoint(self, epoch: int, attempt: int = 0) -> Checkpoint:
        """What a standby gateway needs to go on exactly from here."""
        state = bytes(self.rng.get_state().numpy().tobytes())
        return Checkpoint(tuple(self.out), state, epoch, attempt)


def fresh_checkpoint(task: InferenceTask, epoch: int, attempt: int) -> Checkpoint:
    """A request's checkpoint before its first token (no tokens, the RNG as its seed
    makes it): what a run that starts over after a retraction leaves, so a successor
    starts over too instead of resuming the withdrawn tokens."""
    state = bytes(make_generator(task.sampling).get_state().numpy().tobytes())
    return Checkpoint((), state, epoch, attempt)
