"""How long a prompt's next chunk may be: what a position costs, measured, against the gap
a chunk opens between the tokens of the requests decoding beside it.

A prompt's chunk travels in the same step as the running streams' decode rows, so each of
them waits for it: a chunk of c positions adds about c times a position's cost to their
gap. That cost is the CPU's arithmetic (a chunk's rows are compute-bound where decode
rows are bandwidth-bound), and it differs between machines more than decode does. On an
Intel Xeon (AMX) chunks of 32 raised 8 streams' p95 gap 1.5x; on an AMD EPYC, whose fp32
products peak near 110 GFLOP/s a thread, a position cost 3.3 ms over four stages against
46 ms for the streams' decode step, and the same chunks raised it 3.25x (2026-12-05). A
fixed length is right for one CPU only, so the length comes from what this machine
measures: at most as many positions as add `GAP_BUDGET` decode steps' time to the gap,
never more than `generation.prefill_chunk`, never fewer than `MIN_CHUNK`.

`ChunkTimes` keeps the two measurements; `chunk_length` is the pure choice. The gateway
feeds them its own steps' round trips (`dataplane.engine`): a decode step's, taken only
when no chunk was in flight while it ran (one that shared a step with a chunk measures
the chunk too, and would let the next chunk grow with it), and a chunk step's, less the
decode step's, per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GAP_BUDGET = 0.5
"""A chunk adds at most this many decode steps' time to the running streams' gap. The
target is a p95 gap at most 2x the one without a prompt arriving, and half a step is the
margin: a position's cost grows along the prompt (attention reads every earlier one) and
the estimate runs behind it, and step times vary (clean decode steps of 8 streams took
31-65 ms in one run). At 0.75, 8 streams' p95 gap rose 2.07x (paired median) while a
2,000-token prompt arrived; at 0.5, 1.94x and, after the review's fixes, 1.70x (AMD
EPYC, bench/prefill.py)."""
MIN_CHUNK = 8
"""Fewest positions in a chunk. Every chunk pays a step's fixed cost (the hops, each
stage's read of its weights), so the prompt's own first token slows with each halving:
on the AMD EPYC this floor set most chunks, and 2,000 positions beside 8 streams took
13-15 s against 3 s whole and 7 s in chunks of 32."""
EWMA = 0.3
"""Weight of a new sample: a position's cost moves as the prompt grows, so the estimate
follows within a few chunks."""


@dataclass(frozen=True)
class Mark:
    """A step as it left: `positions` > 1 a prompt's chunk (or a whole prompt, or a
    replay), 1 a decode step (or a prompt's single position), 0 a step not timed (a
    speculative verify step, a replicated request's); `sent` and `quiet` what
    `ChunkTimes` was when it left."""

    request: str
    positions: int
    sent: int
    quiet: bool


@dataclass
class ChunkTimes:
    """The gateway's measured step round trips (seconds), and who is decoding."""

    decode_s: float | None = None
    """A decode step's round trip with no chunk in flight (moving average)."""
    position_s: float | None = None
    """What a chunk step takes beyond a decode step, per position (moving average)."""
    streams: set[str] = field(default_factory=set)
    """Requests decoding: whom a chunk holds up. A request joins with a decode step and
    leaves when a step of it is lost (it waits for a plan, then replays), when it sends
    a replay, and when its generation ends (an audit may follow)."""
    in_flight: int = 0
    """Chunk steps sent and not yet ended."""
    sent: int = 0
    """Chunk steps sent so far: a decode step that saw this change shared a chunk's time.
    (A chunk lost or cancelled may still be computed by the stages after it ended here,
    and a decode step sent then counts as clean: one sample of a moving average.)"""

    def started(self, request: str, positions: int, *, stream: bool) -> Mark:
        """A step of `positions` leaves (0: not timed); `stream`: the request has tokens
        already, so a step of one position (or a verify step) is a decode step."""
        if positions > 1:
            self.streams.discard(request)  # a replay: not decoding until it is done
            self.in_flight += 1
            self.sent += 1
        elif stream:
            self.streams.add(request)
        return Mark(request, positions, self.sent, self.in_flight == 0)

    def ended(self, mark: Mark, seconds: float | None) -> None:
        """The step `mark` ended: answered after `seconds`, or lost (None)."""
        if seconds is None:
            self.streams.discard(mark.request)
        if mark.positions > 1:
            self.in_flight = max(0, self.in_flight - 1)
            if seconds is not None and self.decode_s is not None:
                extra = max(0.0, seconds - self.decode_s) / mark.positions
                self.position_s = _average(self.position_s, extra)
        elif mark.positions == 1 and seconds is not None and self._quiet_since(mark):
            self.decode_s = _average(self.decode_s, seconds)

    def finished(self, request: str) -> None:
        self.streams.discard(request)

    def _quiet_since(self, mark: Mark) -> bool:
        """No chunk step was in flight from when `mark` left until now."""
        return mark.quiet and self.in_flight == 0 and self.sent == mark.sent


def chunk_length(limit: int, times: ChunkTimes, request: str, budget: float = GAP_BUDGET) -> int:
    """Positions in `request`'s next chunk, with `limit` the configured most (0: no chunks,
    the prompt goes whole).

    >>> t = ChunkTimes(decode_s=0.046, position_s=0.0011, streams={"a", "b"})
    >>> chunk_length(32, t, "long")   # 0.5 x 46 ms of 1.1 ms positions
    20
    >>> chunk_length(32, ChunkTimes(decode_s=0.046, position_s=0.0033), "long")  # no stream
    32
    >>> chunk_length(0, t, "long")    # chunking off
    0
    >>> chunk_length(32, ChunkTimes(decode_s=0.046, streams={"a"}), "long")  # not measured
    32
    """
    if limit <= 0:
        return 0
    others = len(times.streams) - (request in times.streams)
    if not others or times.decode_s is None or times.position_s is None:
        return limit
    allowed = budget * times.decode_s  # seconds a chunk may add
    if times.position_s * limit <= allowed:  # (a cost near 0 would overflow the division)
        return limit
    return max(min(MIN_CHUNK, limit), int(allowed / times.position_s))


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA * (new - old)
