"""Generation checkpoints: the seed's recovery example, eviction, and the wire form."""

from __future__ import annotations

import msgpack
import pytest

from butterfly.protocol.checkpoint import Checkpoint, CheckpointManager
from butterfly.types.errors import InvalidMessage
from butterfly.types.ids import Epoch, StageIndex


def raw_checkpoint(**fields: object) -> bytes:
    base: dict[str, object] = {
        "epoch": 0,
        "token_position": 0,
        "tokens": [],
        "rng_state": b"",
        "kv_snapshots": {},
    }
    packed: bytes = msgpack.packb({**base, **fields})
    return packed


def at(position: int, **extra: object) -> Checkpoint:
    return Checkpoint(
        epoch=Epoch(position // 5),
        token_position=position,
        tokens=tuple(range(100, 100 + position)),
        rng_state=b"rng" + bytes([position]),
        **extra,  # type: ignore[arg-type]
    )


def test_seed_example_recovers_from_20_for_a_failure_at_23() -> None:
    manager = CheckpointManager(10)
    manager.set_frequency(5)
    created = []
    for position in range(25):
        if manager.should_checkpoint(position):
            manager.store(at(position))
            created.append(position)
    assert created == [0, 5, 10, 15, 20]
    recovered = manager.get_at_position(23)
    assert recovered is not None
    assert (recovered.token_position, recovered.epoch) == (20, 4)
    assert recovered.tokens == tuple(range(100, 120))
    stats = manager.stats()
    assert (stats.total_created, stats.count) == (5, 5)
    assert stats.avg_size_bytes == stats.total_bytes // 5 > 0


def test_oldest_checkpoints_are_evicted_and_positions_before_the_first_have_none() -> None:
    manager = CheckpointManager(max_stored=2, frequency=1)
    for p in (3, 4, 5):
        manager.store(at(p))
    assert manager.get_at_position(4) is not None and manager.get_at_position(3) is None
    assert manager.stats().count == 2 and manager.stats().total_created == 3
    manager.store(at(5))  # a recomputed step replaces, not duplicates
    assert manager.stats().count == 2
    manager.discard_after(4)
    latest = manager.latest()
    assert latest is not None and latest.token_position == 4


def test_invalid_settings_and_inconsistent_checkpoints_are_refused() -> None:
    with pytest.raises(ValueError):
        CheckpointManager(max_stored=0)
    with pytest.raises(ValueError):
        CheckpointManager().set_frequency(0)
    with pytest.raises(ValueError, match="exactly that many"):
        Checkpoint(Epoch(0), 3, (1, 2))


def test_wire_form_round_trips_with_kv_snapshots() -> None:
    cp = at(7, kv_snapshots={StageIndex(0): b"kv0", StageIndex(2): b"kv2" * 10})
    assert Checkpoint.from_bytes(cp.to_bytes()) == cp


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"epoch": 0}),
        raw_checkpoint(token_position=1, tokens=[-1]),
        raw_checkpoint(token_position=2, tokens=[1]),
        raw_checkpoint(tokens=5),
        raw_checkpoint(kv_snapshots={1: 2}),
        raw_checkpoint(rng_state="text"),
    ],
)
def test_malformed_checkpoints_are_invalid_messages(raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        Checkpoint.from_bytes(raw)


def test_oversized_checkpoints_are_refused_before_decoding() -> None:
    with pytest.raises(InvalidMessage, match="exceeds"):
        Checkpoint.from_bytes(at(3).to_bytes(), max_bytes=8)
