"""Draft tokens from a request's own text (prompt lookup), for speculative decoding.

A request that edits code, extracts fields or quotes its prompt writes long spans it has
already seen. The last few tokens written are looked up in the text so far (prompt and
generated tokens); what followed their latest earlier occurrence is the draft, which one
traversal of the pipeline then verifies (`dataplane.speculate`). Drafting costs no model
and no network: on a text that does not repeat it finds nothing, and the request decodes
as it would without it.

Pure functions over token lists, so the draft depends only on the token history that the
gateway's checkpoint holds: a request resumed on another gateway drafts the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DraftMode = Literal["off", "ngram"]  # generation.speculative.mode

MAX_NGRAM = 3
"""The longest suffix looked up. A longer match predicts better but is found less often;
prompt-lookup decoding (Saxena 2023) and vLLM's n-gram proposer use 3 to 4."""
MIN_NGRAM = 2
"""The shortest suffix a gateway drafts from. A single token recurs by chance in any
text of a few dozen tokens, so 1-token matches mostly draft tokens the model rejects;
measured on the demo models, 2 keeps nearly every accepted draft and drops the wasted
verify steps on text that does not repeat (sampled at temperature 1: 10-12 verify steps
of 64 tokens, none accepted, at 1; none at 2)."""
LOOKBACK = 4096
"""Tokens searched back from the end: a bound on the gateway's work per step (the search
is linear in it) whatever the context length."""


@dataclass(frozen=True)
class Speculation:
    """How the gateway drafts (generation.speculative): `k` tokens per traversal at most,
    by `mode`; "off" (or k = 0) decodes one token per traversal."""

    mode: DraftMode = "off"
    k: int = 4

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.k > 0


def ngram_draft(
    tokens: Sequence[int], k: int, *, max_ngram: int = MAX_NGRAM, min_ngram: int = 1
) -> tuple[int, ...]:
    """Up to `k` tokens that followed the latest earlier occurrence of the text's last
    n tokens, for the longest n in [min_ngram, max_ngram] that occurs; () when none does.

    The latest occurrence, not the first: in an edit the recent copy is the one being
    followed. The copy goes on into the draft itself, as an LZ77 back-reference does,
    so a repeating text (a loop of period d, a run of one token) drafts all k tokens
    instead of stopping at the end of the text.

        >>> ngram_draft([5, 6, 7, 9, 5, 6], 3)
        (7, 9, 5)
        >>> ngram_draft([1, 2, 1, 2], 5)
        (1, 2, 1, 2, 1)
        >>> ngram_draft([1, 2, 3], 2)
        ()
    """
    if k <= 0:
        return ()
    end = len(tokens)
    lo = max(0, end - LOOKBACK)
    for n in range(min(max_ngram, end - 1), min_ngram - 1, -1):
        suffix = list(tokens[end - n :])
        # candidate starts j < end - n, latest first: tokens[j : j + n] == suffix
        for j in range(end - n - 1, lo - 1, -1):
            if tokens[j] == suffix[0] and list(tokens[j : j + n]) == suffix:
                return _copy(tokens, j + n, k)
    return ()


def _copy(tokens: Sequence[int], src: int, k: int) -> tuple[int, ...]:
    """k tokens copied from `src` on, reading the copy's own tokens past the end."""
    end = len(tokens)
    out: list[int] = []
    for i in range(k):
        at = src + i
        out.append(tokens[at] if at < end else out[at - end])
    return tuple(out)


def draft(tokens: Sequence[int], spec: Speculation, budget: int) -> tuple[int, ...]:
    """The draft for the next traversal: at most `spec.k` tokens and at most `budget` (the
    tokens the request may still produce, less the one every traversal yields)."""
    k = min(spec.k, budget)
    if not spec.enabled or k <= 0:
        return ()
    return ngram_draft(tokens, k, min_ngram=MIN_NGRAM)


__all__ = ["LOOKBACK", "MAX_NGRAM", "MIN_NGRAM", "DraftMode", "Speculation", "draft", "ngram_draft"]
