"""Stop strings: where a generation's text first contains one of them.

Both sides of a request need the same answer to the same tokens. The engine detokenizes
as it samples (`TextStops`) and ends the generation at the token whose text completes a
stop string, as at end of sequence, so no step is spent past it; the API's choices
(`api.openai_choices`) cut their text at the same place with the same scanner.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from butterfly.runtime.detok import IncrementalText


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


class TextStops:
    """Whether the tokens so far spell a stop string, one token at a time at a constant
    cost (the incremental decoder and the scanner keep only a bounded tail), and the
    text before it: the result's text, as the API's choices cut it (the whole decoding
    of the tokens has the stop string back in, and a client reading a broken stream's
    result by id was shown it: a review)."""

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str], prompt: Sequence[int] = ()
    ) -> None:
        """`prompt`: the tokens the text continues, as the choices decode it after them
        (a stop string beginning with a SentencePiece token's space matches there too)."""
        self._text = IncrementalText(tokenizer, prompt)
        self._scanner = StopScanner(stops)
        self._before: list[str] = []

    def push(self, token: int) -> bool:
        """Whether the text is now at a stop string (and stays so)."""
        self._before.append(self._scanner.feed(self._text.push(token)))
        return self._scanner.stopped

    def end(self) -> str | None:
        """Once the tokens are all pushed: the text before the stop string, if one was
        reached (in the decoder's last held bytes too, as the choices flush them), else
        None (the text is all of the tokens')."""
        if not self._scanner.stopped:
            self._before.append(self._scanner.feed(self._text.flush()))
        return "".join(self._before) if self._scanner.stopped else None


__all__ = ["StopScanner", "TextStops"]
