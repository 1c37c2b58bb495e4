"""Draft tokens from a request's own text (prompt lookup), for speculative decoding.

A request that edits code, extracts fields or quotes its prompt writes long spans it has
already seen. The last tokens written are looked up in the text so far (prompt and
generated tokens): the longest suffix that occurred before, at its latest occurrence;
what followed it is the draft, which one traversal of the pipeline then verifies
(`dataplane.speculate`). Drafting costs no model and no network: on a text that does not
repeat it finds nothing, and the request decodes as it would without it.

How many tokens to draft follows from the same match (`draft_length`): a text that has
been copying a span for m tokens tends to go on copying, and the longer the copy so far,
the longer the draft worth verifying. That is the acceptance of the recent drafts read
from the text itself: a verify step that confirmed its whole draft lengthened the
match, one that was rejected cut it to where the text left the copy.

Pure functions over token lists, so the draft depends only on the token history that the
gateway's checkpoint holds: a request resumed on another gateway drafts the same tokens
(a k kept as state beside the history would not survive the failover, and a sampled
request's acceptance draws would then differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DraftMode = Literal["off", "ngram", "draft"]  # generation.speculative.mode

MAX_NGRAM = 32
"""The longest suffix looked up. The longest match picks, among the earlier places the
last tokens occurred, the one the text has followed longest (in a loop, the right phase
of it); a short cap (prompt-lookup decoding (Saxena 2023) and vLLM's n-gram proposer use 3
to 4) takes the latest of several, and on the demo models' looping output 3 drafted the
wrong continuation where a longer match had the right one. The match length also sets
the draft's length (`draft_length`), so the cap bounds what that can see."""
MIN_NGRAM = 2
"""The shortest suffix a gateway drafts from on its own. A single token recurs by chance
in any text of a few dozen tokens, so 1-token matches mostly draft tokens the model
rejects (sampled at temperature 1: 10-12 verify steps of 64 tokens, none accepted, with
1-token matches; none at 2). A 1-token match drafts only where the text has shown that
such lookups hold (`single_hits`)."""
RECENT = 16
"""The last tokens over which a 1-token lookup's record is read (`single_hits`)."""
SINGLE_HITS = 3
"""Of the `RECENT` last tokens, how many a 1-token lookup must have predicted before a
1-token match drafts. Replayed offline on the bench's texts (bench/speculative.py's
prompts on the small demo model, 64 tokens): its greedy outputs, whose loops recur in a
fixed order, pass it most of the time, and 1-token matches then took the code prompt
from 1.57 to 1.80 tokens per traversal and the story prompt from 2.10 to 2.42 (k = 8); six
texts sampled at temperature 1 pass it about once per 64 tokens (4 wasted verify rows
per request, against 54 with no such check)."""
FLOOR = 4
"""The shortest draft (`draft_length`) when k allows: in the same replay a floor of 2
gave 1.57-1.62 tokens per traversal on the code prompt against 1.80 at 4."""
LOOKBACK = 4096
"""Tokens searched back from the end: a bound on the gateway's work per step (the search
is linear in it) whatever the context length."""


ACCEPT_WINDOW = 16
"""The last verified draft tokens of a sampled request whose record gates its drafts
(`Acceptance`)."""
MIN_ACCEPTED = 0.3
"""A sampled request drafts from a draft model while at least this share of its last
`ACCEPT_WINDOW` verified draft tokens were kept: at k = 4, about 1.4 tokens a traversal."""
PROBE_EVERY = 8
"""Decode steps a sampled request takes without a draft, once too few were kept, before
it tries one again (the text may have become easier)."""


@dataclass(frozen=True)
class Acceptance:
    """Whether a sampled request drafts from a draft model at its next decode step, from
    what the pipeline kept of its drafts: a greedy guess says little of a sampled text,
    and the small model's own odds say nothing of the served model's. Until half a window
    of verified draft tokens is known, every step drafts; then while at least
    `MIN_ACCEPTED` of them were kept, and otherwise after `PROBE_EVERY` steps without a
    draft (one step in PROBE_EVERY + 1). It changes only as steps' outputs are used, so a
    step retried (the plan moved, a stage was lost) drafts as the first try would have.
    Kept by the gateway beside the request, not in its checkpoint: a successor starts
    with an empty record."""

    kept: tuple[bool, ...] = ()
    undrafted: int = 0

    def drafts(self) -> bool:
        n = len(self.kept)
        return (
            n < ACCEPT_WINDOW // 2
            or sum(self.kept) >= MIN_ACCEPTED * n
            or self.undrafted >= PROBE_EVERY
        )

    def verified(self, drafted: int, kept: int) -> Acceptance:
        """A step that verified `drafted` tokens and kept the first `kept`: they count as
        kept, and the first rejected one, if any, as not (those after it were not judged)."""
        judged = [True] * min(kept, drafted) + [False] * (kept < drafted)
        return Acceptance((*self.kept, *judged)[-ACCEPT_WINDOW:], 0)

    def undrafted_step(self) -> Acceptance:
        """A decode step whose output was used, taken without a draft."""
        return Acceptance(self.kept, self.undrafted + 1)


@dataclass(frozen=True)
class Speculation:
    """How the gateway drafts (generation.speculative): `k` tokens per traversal at most,
    by `mode`: "ngram" from the text itself (`draft`), "draft" from a small model
    (`dataplane.drafter`); "off" (or k = 0) decodes one token per traversal."""

    mode: DraftMode = "off"
    k: int = 4


def longest_match(
    tokens: Sequence[int], *, max_ngram: int = MAX_NGRAM, min_ngram: int = 1
) -> tuple[int, int]:
    """(n, at): the longest n in [min_ngram, max_ngram] for which the text's last n tokens
    occurred earlier (within `LOOKBACK`), and `at`, the position just after their latest
    earlier occurrence; (0, 0) when none does.

    Occurring is monotone in n (an occurrence of the last n tokens holds one of the last
    n - 1), so n is found by bisection, each probe one `str.rfind` over the window (in C:
    about 20 us for 4,096 tokens, where a Python loop over it took milliseconds).

        >>> longest_match([1, 2, 3, 9, 1, 2, 3])
        (3, 3)
        >>> longest_match([1, 2, 3])
        (0, 0)
    """
    end = len(tokens)
    lo = max(0, end - LOOKBACK)
    hi = min(max_ngram, end - lo - 1)
    if hi < min_ngram:
        return 0, 0
    try:
        text = "".join(map(chr, tokens[lo:]))  # one character per token id, for rfind
    except (ValueError, OverflowError):  # an id past the last code point: none has that
        return 0, 0
    body = len(text) - 1  # an earlier occurrence ends before the text's last token

    def latest(n: int) -> int:
        return text.rfind(text[-n:], 0, body)

    if latest(min_ngram) < 0:
        return 0, 0
    good, bad = min_ngram, hi + 1  # occurs at `good`; does not at `bad`
    while bad - good > 1:
        mid = (good + bad) // 2
        if latest(mid) >= 0:
            good = mid
        else:
            bad = mid
    return good, lo + latest(good) + good


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
    n, at = longest_match(tokens, max_ngram=max_ngram, min_ngram=min_ngram)
    return _copy(tokens, at, k) if n else ()


def single_hits(tokens: Sequence[int], recent: int = RECENT) -> int:
    """How many of the last `recent` tokens a 1-token lookup would have predicted: the
    token that followed the latest earlier occurrence of the one before it. The record
    of the drafts' acceptance, read from the text itself (so a resumed request reads the
    same), for the weakest kind of match.

        >>> single_hits([1, 2, 3, 1, 2, 3, 1, 2])
        4
        >>> single_hits([1, 2, 3, 4, 5, 6])
        0
    """
    end = len(tokens)
    lo = max(0, end - LOOKBACK)
    try:
        text = "".join(map(chr, tokens[lo:]))
    except (ValueError, OverflowError):
        return 0
    hits = 0
    for i in range(max(1, len(text) - recent), len(text)):
        j = text.rfind(text[i - 1], 0, i - 1)
        hits += j >= 0 and text[j + 1] == text[i]
    return hits


def draft_length(match: int, k: int) -> int:
    """Tokens to draft after a match of `match` tokens, at most `k`: as many as the text
    has copied so far, at least `FLOOR`.

    A verify step costs about the same whether it checks 2 positions or 9 (a decode step
    on a CPU reads every weight once either way, and the links' latency is the same), so
    a rejected draft costs little beyond its own traversal; what it buys is capped by how
    far the copy goes on. The match says how far it went so far: after a fresh 2-token
    match most drafts fail within a few tokens, and in a copy 20 tokens long the next 8
    are nearly always right (the demo models' greedy loops, bench/speculative.py).

        >>> [draft_length(m, 8) for m in (1, 2, 5, 8, 30)]
        [4, 4, 5, 8, 8]
    """
    return max(0, min(k, max(FLOOR, match)))


def _copy(tokens: Sequence[int], src: int, k: int) -> tuple[int, ...]:
    """k tokens copied from `src` on, reading the copy's own tokens past the end."""
    end = len(tokens)
    out: list[int] = []
    for i in range(k):
        at = src + i
        out.append(tokens[at] if at < end else out[at - end])
    return tuple(out)


def draft(tokens: Sequence[int], spec: Speculation, budget: int) -> tuple[int, ...]:
    """The prompt-lookup draft for the next traversal: `draft_length` tokens of the
    longest match, at most `spec.k` and at most `budget` (the tokens the request may
    still produce, less the one every traversal yields); () unless the mode is "ngram"."""
    k = min(spec.k, budget)
    if spec.mode != "ngram" or k <= 0:
        return ()
    n, at = longest_match(tokens)
    if n == 0 or (n < MIN_NGRAM and single_hits(tokens) < SINGLE_HITS):
        return ()
    return _copy(tokens, at, draft_length(n, k))


__all__ = [
    "ACCEPT_WINDOW",
    "FLOOR",
    "LOOKBACK",
    "MAX_NGRAM",
    "MIN_ACCEPTED",
    "MIN_NGRAM",
    "PROBE_EVERY",
    "RECENT",
    "SINGLE_HITS",
    "Acceptance",
    "DraftMode",
    "Speculation",
    "draft",
    "draft_length",
    "longest_match",
    "ngram_draft",
    "single_hits",
]
