"""One choice of a completion as its tokens arrive: text deltas, stop strings, logprobs.

The same `ChoiceText` shapes a streamed choice (a delta per token) and a whole one (all
tokens at once), so both answer the same text for the same tokens. Text goes through the
incremental decoder (`runtime.detok`), then the stop scanner, which holds back any tail
that might be the start of a stop string until the next token settles it: a stream never
shows a client text that a stop string then cuts away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from butterfly.api.openai_schema import CompletionLogprobs, Finish, TokenLogprob, TopLogprob
from butterfly.runtime.detok import IncrementalText
from butterfly.runtime.stops import StopScanner
from butterfly.types.tasks import Sampled


@dataclass
class ChoiceText:
    """What one choice has produced so far; `finish` once it is over."""

    index: int
    tokenizer: Tokenizer
    stops: StopScanner
    eos_ids: frozenset[int]
    prompt: list[int] = field(default_factory=list)  # the token ids it continues
    decoder: IncrementalText = field(init=False)
    tokens: list[int] = field(default_factory=list)
    scored: list[Sampled | None] = field(default_factory=list)
    pending: list[Sampled | None] = field(default_factory=list)  # since the last delta
    finish: Finish | None = None
    emitted: str = ""  # the text given out so far, cut at a stop string
    # the prompt's tokens 1..T-1 scored (echo with logprobs): from the engine's
    # `PromptScored` in a stream, from the finished result otherwise
    prompt_scored: tuple[Sampled, ...] = ()

    def __post_init__(self) -> None:
        self.decoder = IncrementalText(self.tokenizer)

    def reset(self) -> None:
        """Every token so far was withdrawn (an audit caught a liar)."""
        self.decoder = IncrementalText(self.tokenizer)
        self.stops = StopScanner(self.stops.stops)
        self.tokens, self.scored, self.pending = [], [], []
        self.finish, self.emitted = None, ""

    def push(self, token: int | Sampled) -> str:
        """The text this token adds; sets `finish` at a stop string or end of sequence."""
        if self.finish is not None:
            return ""
        sampled = token if isinstance(token, Sampled) else None
        token_id = token.token if isinstance(token, Sampled) else token
        self.tokens.append(token_id)
        self.scored.append(sampled)
        self.pending.append(sampled)
        delta = self.stops.feed(self.decoder.push(token_id))
        if self.stops.stopped or token_id in self.eos_ids:
            delta += self.stops.feed(self.decoder.flush()) + self.stops.flush()
            self.finish = "stop"
        self.emitted += delta
        return delta

    def end(self, finish: Finish = "length") -> str:
        """The text held back at the end of the tokens; `finish` unless it stopped."""
        if self.finish is not None:
            return ""
        self.finish = finish
        delta = self.stops.feed(self.decoder.flush()) + self.stops.flush()
        self.emitted += delta
        return delta

    def take_pending(self) -> list[Sampled | None]:
        taken, self.pending = self.pending, []
        return taken

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def shown_length(self, token: int) -> int:
        """How far `token` moves a `text_offset`: what it adds to the returned text, which
        leaves special tokens out (an echoed prompt's BOS is named in `tokens`, at the
        offset of the text after it)."""
        return len(self.tokenizer.decode([token], skip_special_tokens=True))


def chat_logprobs(choice: ChoiceText, entries: Sequence[Sampled | None]) -> list[TokenLogprob]:
    """The chat API's logprobs of `entries` (tokens resumed from a checkpoint, which
    carry none, are left out)."""
    out = []
    for s in entries:
        if s is None:
            continue
        text = choice.token_text(s.token)
        top = [
            TopLogprob(token=(t := choice.token_text(i)), logprob=lp, bytes=list(t.encode()))
            for i, lp in s.top
        ]
        out.append(
            TokenLogprob(token=text, logprob=s.logprob, bytes=list(text.encode()), top_logprobs=top)
        )
    return out


def completion_logprobs(
    choice: ChoiceText,
    entries: Sequence[Sampled | None],
    offset: int,
    prompt: Sequence[int] = (),
) -> CompletionLogprobs:
    """The completions API's logprobs; offsets start at `offset`. `prompt` (under `echo`)
    comes first, as in OpenAI and vLLM: its first token's logprob is null (nothing comes
    before it), the others' are those the engine scored (`ChoiceText.prompt_scored`),
    null where it has none (a one-token prompt has nothing to score)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    scored = (None, *choice.prompt_scored)
    for i, token in enumerate(prompt):
        offsets.append(offset)
        tokens.append(choice.token_text(token))
        offset += choice.shown_length(token)
        s = scored[i] if i < len(scored) else None
        values.append(None if s is None else s.logprob)
        tops.append(None if s is None else {choice.token_text(t): lp for t, lp in s.top})
    for s in entries:
        if s is None:
            continue
        offsets.append(offset)
        tokens.append(choice.token_text(s.token))
        offset += choice.shown_length(s.token)
        values.append(s.logprob)
        tops.append({choice.token_text(i): lp for i, lp in s.top})
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


__all__ = ["ChoiceText", "StopScanner", "chat_logprobs", "completion_logprobs"]
