"""Heartbeats over UDP on their own threads: signed, replay-proof, not delayed by torch."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from butterfly.control.heartbeats import BeatSource, HeartbeatLink, decode_beat, encode_beat
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.control import Heartbeat

pytestmark = pytest.mark.ports  # UDP ports picked, then bound

KEYS = {NodeId(0): SigningKey.generate(), NodeId(1): SigningKey.generate()}
PUBLIC = {n: k.public for n, k in KEYS.items()}


def source(node: int, cluster: str = "c") -> BeatSource:
    return BeatSource(NodeId(node), cluster, KEYS[NodeId(node)], PUBLIC)


def udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Received:
    def __init__(self) -> None:
        self.beats: list[tuple[float, NodeId, Heartbeat]] = []
        self.lock = threading.Lock()

    def __call__(self, sender: NodeId, beat: Heartbeat) -> None:
        with self.lock:
            self.beats.append((time.monotonic(), sender, beat))

    def wait_for(self, count: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.beats) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.beats) >= count, f"{len(self.beats)} heartbeats in {timeout_s} s"


def link(
    node: int, port: int, peer_port: int, on_beat: Received | None = None, **kw: float
) -> HeartbeatLink:
    """Node `node` on `port`, its one peer (the other node) on `peer_port`."""
    return HeartbeatLink(
        source(node),
        listen=("127.0.0.1", port),
        peers={NodeId(1 - node): ("127.0.0.1", peer_port)},
        interval_s=kw.pop("interval_s", 0.05),
        local_state=lambda: ((0, 2), 3) if node == 0 else ((), 0),
        on_beat=on_beat or (lambda n, b: None),
        **kw,
    )


@pytest.fixture
def pair() -> Iterator[tuple[HeartbeatLink, HeartbeatLink, Received]]:
    """Node 0 beats to node 1 every 50 ms; node 1 records what arrives."""
    p0, p1 = udp_ports(2)
    got = Received()
    sender = link(0, p0, p1, loop_stall_s=0.5)
    receiver = link(1, p1, p0, got)
    sender.start()
    receiver.start()
    try:
        yield sender, receiver, got
    finally:
        sender.close()
        receiver.close()


def test_beats_arrive_with_the_senders_state(pair: tuple[HeartbeatLink, ...]) -> None:
    sender, _, got = pair
    for _ in range(6):
        sender.loop_ticked()
        time.sleep(0.05)
    got.wait_for(3)
    _, node, beat = got.beats[-1]
    assert node == 0 and beat.layers == (0, 2) and beat.requests == 3
    seqs = [b.seq for _, _, b in got.beats]
    assert seqs == sorted(set(seqs))


def test_torch_on_the_main_thread_does_not_delay_heartbeats(
    pair: tuple[HeartbeatLink, ...],
) -> None:
    """What inline decode steps do to a node's event loop: busy for a second."""
    sender, _, got = pair
    sender.loop_ticked()
    got.wait_for(1)
    start = time.monotonic()
    a = torch.randn(384, 384)
    while time.monotonic() - start < 0.45:  # inside loop_stall_s, as inline steps are
        a = torch.tanh(a @ a)
    arrivals = [t for t, _, _ in got.beats if t >= start]
    assert len(arrivals) >= 5
    gaps = [b - a for a, b in zip([start, *arrivals], arrivals, strict=False)]
    assert max(gaps) < 0.25


def test_a_wedged_event_loop_stops_the_beats(pair: tuple[HeartbeatLink, ...]) -> None:
    sender, _, got = pair
    sender.loop_ticked()
    got.wait_for(2)
    time.sleep(0.8)  # no loop_ticked for longer than loop_stall_s = 0.5
    count = len(got.beats)
    time.sleep(0.4)
    assert len(got.beats) == count
    sender.loop_ticked()
    got.wait_for(count + 1, timeout_s=1.0)


def test_forged_replayed_and_foreign_beats_are_refused() -> None:
    beat = Heartbeat(NodeId(0), Epoch(0), 10)
    good = encode_beat(source(0), beat)
    assert decode_beat(source(1), good) == (NodeId(0), beat)
    forged = encode_beat(BeatSource(NodeId(0), "c", SigningKey.generate(), PUBLIC), beat)
    tampered = good[:-10] + bytes([good[-10] ^ 1]) + good[-9:]
    for bad, why in [
        (forged, "no valid signature"),
        (tampered, "no valid signature"),
        (encode_beat(source(0, "other"), beat), "another cluster"),
        (encode_beat(source(1), beat), "not a peer's heartbeat"),  # our own, echoed
        (b"\x00" * 40, "too short"),
    ]:
        with pytest.raises(WireFormatError, match=why):
            decode_beat(source(1), bad)


def test_a_replayed_beat_is_not_delivered() -> None:
    p0, p1 = udp_ports(2)
    got = Received()
    receiver = link(1, p1, p0, got, interval_s=10.0)
    receiver.start()
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for seq in (5, 5, 4, 6):
            beat = Heartbeat(NodeId(0), Epoch(0), seq)
            out.sendto(encode_beat(source(0), beat), ("127.0.0.1", p1))
        got.wait_for(2)
        time.sleep(0.2)
        assert [b.seq for _, _, b in got.beats] == [5, 6]
    finally:
        out.close()
        receiver.close()
