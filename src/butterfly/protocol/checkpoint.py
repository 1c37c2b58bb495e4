"""Generation checkpoints: what a replacement stage needs to resume a request exactly.

The canonical checkpoint of a generation is its token history, the sampling RNG state and
the epoch (DESIGN.md section 3): with those, re-running the prompt plus the tokens so far
reproduces the same next token, so recovery yields exactly the tokens the request would
have produced. KV snapshots per stage are an optional shortcut: a replacement restores
the latest one and recomputes only the tokens after it ("recovered at 20, recomputing
20 -> 23").

`CheckpointManager` keeps the most recent `max_stored` checkpoints of one generation and
answers "where do I resume from position p": the newest checkpoint at or before p.
Checkpoints travel as strict msgpack (`to_bytes`/`from_bytes`), never pickle.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack

from butterfly.types.errors import InvalidMessage
from butterfly.types.ids import Epoch, StageIndex

MAX_SNAPSHOT_BYTES = 1 << 30
"""A KV snapshot is bounded too: a peer's frame cannot make us allocate without limit."""


@dataclass(frozen=True)
class Checkpoint:
    """State of one generation after `token_position` generated tokens."""

    epoch: Epoch  # the plan generation the tokens were produced under
    token_position: int  # number of generated tokens so far
    tokens: tuple[int, ...]  # the generated tokens, exactly `token_position` of them
    rng_state: bytes = b""  # sampling generator state after the last token
    kv_snapshots: Mapping[StageIndex, bytes] = field(default_factory=dict)  # per stage

    def __post_init__(self) -> None:
        if self.token_position < 0:
            raise ValueError(f"token position {self.token_position} is negative")
        if len(self.tokens) != self.token_position:
            raise ValueError(
                f"a checkpoint at position {self.token_position} must hold exactly that many "
                f"tokens, got {len(self.tokens)}"
            )

    @property
    def size_bytes(self) -> int:
        """Encoded size: what storing or shipping this checkpoint costs."""
        return len(self.to_bytes())

    def to_bytes(self) -> bytes:
        data: bytes = msgpack.packb(
            {
                "epoch": int(self.epoch),
                "token_position": self.token_position,
                "tokens": list(self.tokens),
                "rng_state": self.rng_state,
                "kv_snapshots": {int(k): v for k, v in self.kv_snapshots.items()},
            },
            use_bin_type=True,
        )
        return data

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_SNAPSHOT_BYTES) -> Checkpoint:
        """Decode a checkpoint from a peer or disk; anything malformed is `InvalidMessage`."""
        if len(data) > max_bytes:
            raise InvalidMessage(f"checkpoint of {len(data)} bytes exceeds {max_bytes}")
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise InvalidMessage(f"checkpoint is not valid msgpack: {e}") from e
        fields = {"epoch", "token_position", "tokens", "rng_state", "kv_snapshots"}
        if type(raw) is not dict or set(raw) != fields:
            raise InvalidMessage(f"checkpoint must be a map with exactly {sorted(fields)}")
        if type(raw["tokens"]) is not list:
            raise InvalidMessage("checkpoint tokens must be a list of integers")
        ints = [raw["epoch"], raw["token_position"], *raw["tokens"]]
        if any(type(v) is not int or v < 0 for v in ints):
            raise InvalidMessage("checkpoint epoch, position and tokens must be integers >= 0")
        snaps = raw["kv_snapshots"]
        if type(raw["rng_state"]) is not bytes or type(snaps) is not dict:
            raise InvalidMessage("checkpoint rng_state must be bytes, kv_snapshots a map")
        if any(type(k) is not int or k < 0 or type(v) is not bytes for k, v in snaps.items()):
            raise InvalidMessage("checkpoint kv_snapshots must map stage indices to bytes")
        try:
            return cls(
                epoch=Epoch(raw["epoch"]),
                token_position=raw["token_position"],
                tokens=tuple(raw["tokens"]),
                rng_state=raw["rng_state"],
                kv_snapshots={StageIndex(k): v for k, v in snaps.items()},
            )
        except ValueError as e:
            raise InvalidMessage(f"checkpoint is inconsistent: {e}") from e


@dataclass(frozen=True, slots=True)
class CheckpointStats:
    total_created: int  # checkpoints ever stored, including evicted ones
    count: int  # checkpoints held now
    total_bytes: int  # encoded bytes held now
    avg_size_bytes: int  # total_bytes / count (0 when empty)


class CheckpointManager:
    """The latest checkpoints of one generation, oldest evicted first."""

    def __init__(self, max_stored: int = 10, frequency: int = 10) -> None:
        if max_stored < 1:
            raise ValueError(f"max_stored must be at least 1, got {max_stored}")
        self.max_stored = max_stored
        self.frequency = 1
        self.set_frequency(frequency)
        self._positions: list[int] = []
        self._checkpoints: dict[int, Checkpoint] = {}
        self._sizes: dict[int, int] = {}
        self._created = 0

    def set_frequency(self, frequency: int) -> None:
        """Checkpoint every `frequency` tokens: cheaper runs vs. less recomputation."""
        if frequency < 1:
            raise ValueError(f"checkpoint frequency must be at least 1 token, got {frequency}")
        self.frequency = frequency

    def should_checkpoint(self, token_position: int) -> bool:
        return token_position >= 0 and token_position % self.frequency == 0

    def store(self, checkpoint: Checkpoint) -> None:
        """Keep `checkpoint`, replacing one at the same position (a recomputed step)."""
        position = checkpoint.token_position
        if position not in self._checkpoints:
            bisect.insort(self._positions, position)
        self._checkpoints[position] = checkpoint
        self._sizes[position] = checkpoint.size_bytes
        self._created += 1
        while len(self._positions) > self.max_stored:
            oldest = self._positions.pop(0)
            del self._checkpoints[oldest], self._sizes[oldest]

    def get_at_position(self, token_position: int) -> Checkpoint | None:
        """The newest checkpoint at or before `token_position`: where recovery resumes."""
        i = bisect.bisect_right(self._positions, token_position)
        return self._checkpoints[self._positions[i - 1]] if i else None

    def latest(self) -> Checkpoint | None:
        return self._checkpoints[self._positions[-1]] if self._positions else None

    def discard_after(self, token_position: int) -> None:
        """Forget checkpoints past a recovery point: they are recomputed, not trusted."""
        while self._positions and self._positions[-1] > token_position:
            gone = self._positions.pop()
            del self._checkpoints[gone], self._sizes[gone]

    def stats(self) -> CheckpointStats:
        total = sum(self._sizes.values())
        count = len(self._positions)
        return CheckpointStats(self._created, count, total, total // count if count else 0)
