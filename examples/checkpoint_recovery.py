"""Seed 000's "Checkpoint Recovery" example: checkpoint every 5 tokens, fail at 23.

Each checkpoint holds what recovery needs to produce exactly the tokens the request would
have produced: the generated tokens, the sampling RNG state, the epoch, and (optionally)
a KV-cache snapshot per stage, so a replacement only recomputes the tokens after it.

    .venv/bin/python examples/checkpoint_recovery.py
"""

from __future__ import annotations

import random

from butterfly.protocol.checkpoint import Checkpoint, CheckpointManager
from butterfly.types.ids import Epoch, StageIndex


def main() -> None:
    manager = CheckpointManager(10)
    manager.set_frequency(5)  # checkpoint every 5 tokens
    rng = random.Random(0)
    tokens: list[int] = []

    for token_pos in range(25):
        if manager.should_checkpoint(token_pos):
            checkpoint = Checkpoint(
                epoch=Epoch(token_pos // 5),
                token_position=token_pos,
                tokens=tuple(tokens),
                rng_state=repr(rng.getstate()[1][:4]).encode(),
                kv_snapshots={StageIndex(0): bytes([1, 2, 3]), StageIndex(1): bytes([4, 5, 6])},
            )
            manager.store(checkpoint)
            print(f"Checkpoint created at token position {token_pos}")
        tokens.append(rng.randrange(32000))  # the token generated at this position

    print("\nFailure at position 23, recovering...")
    recovery = manager.get_at_position(23)
    if recovery is None:
        raise SystemExit("no checkpoint at or before position 23")
    print(
        f"Recovered from checkpoint at position {recovery.token_position} (epoch {recovery.epoch})"
    )
    print(f"Recomputing: {recovery.token_position} -> 23")

    stats = manager.stats()
    print("\nCheckpoint stats:")
    print(f"  Total created: {stats.total_created}")
    print(f"  Currently stored: {stats.count}")
    print(f"  Total size: {stats.total_bytes / 1024:.1f} KB")
    print(f"  Average size: {stats.avg_size_bytes} bytes")


if __name__ == "__main__":
    main()
