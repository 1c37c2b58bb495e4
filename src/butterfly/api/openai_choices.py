"""One choice of a completion as its tokens arrive: text deltas, stop strings, logprobs.

The same `ChoiceText` shapes a streamed choice (a delta per token) and a whole one (all
tokens at once), so both answer the same text for the same tokens. Text goes through the
incremental decoder (`runtime.detok`), then the stop scanner, which holds back any tail
that might be the start of a stop string until the next token settles it: a stream never
shows a client text that a stop string then cuts away.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from butterfly.api.openai_schema import CompletionLogprobs, Finish, TokenLogprob, TopLogprob
from butterfly.runtime.detok import IncrementalText, bytes_text, special_ids, token_bytes
from butterfly.runtime.stops import StopScanner
from butterfly.types.tasks import Sampled


class TextOffsets:
    """Characters of the returned text so far, as a token's bytes complete them."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.at = 0

    def advance(self, shown: bytes) -> int:
        """Where the text of `shown` starts: at the character its first byte belongs to,
        which that byte may complete (the rest of an "é"), leave open (its first half),
        or follow (bytes before it that it shows were no character: one U+FFFD for them,
        then its own). The count moves past everything it completes."""
        if not shown:
            return self.at
        out = self._utf8.decode(shown[:1])
        held = self._utf8.getstate()[0]  # the first byte, still open: all of out is before
        start = self.at + len(out) - (0 if held else 1)
        self.at += len(out) + len(self._utf8.decode(shown[1:]))
        return start


@dataclass
class ChoiceText:
    """What one choice has produced so far; `finish` once it is over."""

    index: int
    tokenizer: Tokenizer
    stops: StopScanner
    eos_ids: frozenset[int]
    prompt: list[int] = field(default_factory=list)  # the token ids it continues
    decoder: IncrementalText = field(init=False)
    offsets: TextOffsets = field(init=False)  # where the logprobs' next token starts
    tokens: list[int] = field(default_factory=list)
    scored: list[Sampled | None] = field(default_factory=list)
    pending: list[Sampled | None] = field(default_factory=list)  # since the last delta
    finish: Finish | None = None
    emitted: str = ""  # the text given out so far, cut at a stop string
    # the prompt's tokens 1..T-1 scored (echo with logprobs): from the engine's
    # `PromptScored` in a stream, from the finished result otherwise
    prompt_scored: tuple[Sampled, ...] = ()

    def __post_init__(self) -> None:
        self.decoder = IncrementalText(self.tokenizer, self.prompt)
        self.offsets = TextOffsets()

    def reset(self) -> None:
        """Every token so far was withdrawn (an audit caught a liar)."""
        self.decoder = IncrementalText(self.tokenizer, self.prompt)
        self.offsets = TextOffsets()
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

    def token_bytes(self, token: int) -> bytes:
        return token_bytes(self.tokenizer, token)

    def shown_bytes(self, token: int) -> bytes:
        """The bytes `token` adds to the returned text: none for a special token, which
        the text leaves out (chat's `bytes` join into the content; a sampled <|bos|>
        put its name's bytes there: a review)."""
        return b"" if token in special_ids(self.tokenizer) else self.token_bytes(token)

    def token_text(self, token: int) -> str:
        """As OpenAI names it: its characters, or `bytes:\\xNN` for part of one."""
        return bytes_text(self.token_bytes(token))

    def named(self, token: int) -> tuple[str, int]:
        """The next token's name (`token_text`) and where it starts in the returned text
        (`text_offset`), which leaves special tokens out (an echoed prompt's BOS sits at
        the offset of the text after it) and counts characters: a token holding part of
        one starts where that character does. Counted across the calls (a stream's chunks
        go on from the last)."""
        return bytes_text(self.token_bytes(token)), self.offsets.advance(self.shown_bytes(token))


def chat_logprobs(choice: ChoiceText, entries: Sequence[Sampled | None]) -> list[TokenLogprob]:
    """The chat API's logprobs of `entries` (tokens resumed from a checkpoint, which
    carry none, are left out)."""
    out = []
    for s in entries:
        if s is None:
            continue
        top = [
            TopLogprob(token=choice.token_text(i), logprob=lp, bytes=list(choice.shown_bytes(i)))
            for i, lp in s.top
        ]
        out.append(
            TokenLogprob(
                token=choice.token_text(s.token),
                logprob=s.logprob,
                bytes=list(choice.shown_bytes(s.token)),
                top_logprobs=top,
            )
        )
    return out


def completion_logprobs(
    choice: ChoiceText,
    entries: Sequence[Sampled | None],
    prompt: Sequence[int] = (),
) -> CompletionLogprobs:
    """The completions API's logprobs; offsets go on from the choice's last
    (`ChoiceText.named`: a stream's chunks restarted at 0). `prompt` (under `echo`)
    comes first, as in OpenAI and vLLM: its first token's logprob is null (nothing comes
    before it), the others' are those the engine scored (`ChoiceText.prompt_scored`),
    null where it has none (a one-token prompt has nothing to score)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    scored = (None, *choice.prompt_scored)
    for i, token in enumerate(prompt):
        name, at = choice.named(token)
        tokens.append(name)
        offsets.append(at)
        s = scored[i] if i < len(scored) else None
        values.append(None if s is None else s.logprob)
        tops.append(None if s is None else _top_logprobs(choice, s))
    for s in entries:
        if s is None:
            continue
        name, at = choice.named(s.token)
        tokens.append(name)
        offsets.append(at)
        values.append(s.logprob)
        tops.append(_top_logprobs(choice, s))
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


def _top_logprobs(choice: ChoiceText, s: Sampled) -> dict[str, float]:
    """The k likeliest tokens' logprobs and the chosen token's own, as OpenAI ("always
    the logprob of the sampled token, so up to logprobs+1 elements") and vLLM give them:
    clients read `top_logprobs[i][tokens[i]]`, which raised KeyError for a token outside
    the k (every one with `logprobs: 0`; a review)."""
    top = {choice.token_text(t): lp for t, lp in s.top}
    top.setdefault(choice.token_text(s.token), s.logprob)
    return top


__all__ = ["ChoiceText", "StopScanner", "chat_logprobs", "completion_logprobs"]
