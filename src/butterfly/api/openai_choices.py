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
from butterfly.types.tasks import Sampled


class StopScanner:
    """Cuts text before the first stop string it contains."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held) that is certainly before any stop."""
        if self.stopped:
            return ""
        buffer = self._held + text
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return buffer[: min(found)]
        hold = 0  # the longest tail that is a proper prefix of a stop string
        for n in range(min(self._keep, len(buffer)), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                hold = n
                break
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


@dataclass
class ChoiceText:
    """What one choice has produced so far; `finish` once it is over."""

    index: int
    tokenizer: Tokenizer
    stops: StopScanner
    eos_ids: frozenset[int]
    decoder: IncrementalText = field(init=False)
    tokens: list[int] = field(default_factory=list)
    scored: list[Sampled | None] = field(default_factory=list)
    pending: list[Sampled | None] = field(default_factory=list)  # since the last delta
    finish: Finish | None = None
    emitted: str = ""  # the text given out so far, cut at a stop string

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
    """The completions API's logprobs; `prompt` (under `echo`) comes first with null
    logprobs (Butterfly does not compute the prompt's); offsets start at `offset`."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token in prompt:
        offsets.append(offset)
        tokens.append(text := choice.token_text(token))
        offset += len(text)
        values.append(None)
        tops.append(None)
    for s in entries:
        if s is None:
            continue
        offsets.append(offset)
        tokens.append(text := choice.token_text(s.token))
        offset += len(text)
        values.append(s.logprob)
        tops.append({choice.token_text(i): lp for i, lp in s.top})
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


__all__ = ["ChoiceText", "StopScanner", "chat_logprobs", "completion_logprobs"]
