"""Heartbeats over UDP from threads of their own, signed by the sender.

A node runs torch on its event loop for short decode steps (dataplane.stage_server), and a
loaded event loop decodes frames, answers HTTP and runs agreement; none of that may delay
a heartbeat or make a healthy node look dead. So heartbeats leave and arrive on two
daemon threads with one UDP socket (on the node's listen address, UDP beside the TCP
transport), and a lost datagram costs one interval, which the phi detector tolerates.

A live thread does not prove a working node: the sender stops beating when the event
loop has not ticked for `loop_stall_s`, so a wedged node is detected as failed.

Each datagram is an encoded `Heartbeat` frame followed by the sender's Ed25519
signature over it (keys are configuration, protocol.keys); the sequence number starts at
the sender's wall-clock start time in microseconds, and a receiver accepts only
increasing numbers per sender, so a replayed heartbeat cannot keep a dead node alive
while a restarted one is accepted at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from butterfly.net.framing import LENGTH, Envelope, decode_frame, encode_frame
from butterfly.protocol.sign import SIGNATURE_SIZE, SigningKey, verify_once
from butterfly.types.errors import ConfigError, WireFormatError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import PROTOCOL_VERSION
from butterfly.types.wire.control import Heartbeat

log = logging.getLogger(__name__)

MAX_DATAGRAM = 1024
LOOP_STALL_S = 5.0


@dataclass(frozen=True)
class BeatSource:
    """Who we are and what we tell peers about ourselves."""

    node: NodeId
    cluster_id: str
    key: SigningKey
    public_keys: dict[NodeId, bytes]


def encode_beat(src: BeatSource, beat: Heartbeat) -> bytes:
    frame = encode_frame(Envelope(beat, src.node, beat.epoch, src.cluster_id))
    return frame + src.key.sign(frame)


def decode_beat(src: BeatSource, data: bytes) -> tuple[NodeId, Heartbeat]:
    """The sender and its heartbeat; WireFormatError for anything not a valid, signed beat."""
    frame, signature = data[:-SIGNATURE_SIZE], data[-SIGNATURE_SIZE:]
    if len(frame) <= LENGTH.size:
        raise WireFormatError(f"heartbeat datagram of {len(data)} bytes is too short")
    env = decode_frame(frame[LENGTH.size :], max_payload=0)
    sender, beat = env.sender, env.msg
    if env.version != PROTOCOL_VERSION or env.cluster_id != src.cluster_id:
        raise WireFormatError(f"heartbeat from node {sender} of another cluster or version")
    if not isinstance(beat, Heartbeat) or beat.sender != sender or sender == src.node:
        raise WireFormatError(f"datagram from node {sender} is not a peer's heartbeat")
    key = src.public_keys.get(sender)
    if key is None or not verify_once(key, signature, frame):
        raise WireFormatError(f"heartbeat claiming node {sender} has no valid signature")
    return sender, beat


class HeartbeatLink:
    """Sends our heartbeat to every peer each interval; hands every valid one received
    to `on_beat(sender, beat)`, from the receiving thread."""

    def __init__(
        self,
        source: BeatSource,
        *,
        listen: tuple[str, int],
        peers: Mapping[NodeId, tuple[str, int]],  # read on every beat: the roster's
        interval_s: float,
        local_state: Callable[[], tuple[tuple[int, ...], int]],
        on_beat: Callable[[NodeId, Heartbeat], None],
        loop_stall_s: float = LOOP_STALL_S,
    ) -> None:
        self._src, self._peers, self._interval = source, peers, interval_s
        self._local_state, self._on_beat, self._stall = local_state, on_beat, loop_stall_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind(listen)
        except OSError as e:
            self._sock.close()
            raise ConfigError(f"cannot bind heartbeats to UDP {listen[0]}:{listen[1]}: {e}") from e
        self._sock.settimeout(0.2)  # how often the receiver looks at `_stop`
        self._stop = threading.Event()
        self._last_seq: dict[NodeId, int] = {}
        self._loop_tick = time.monotonic()
        self._silent = False  # `silence`: read by the sending thread
        self._threads = [
            threading.Thread(target=self._send_loop, name="heartbeat-send", daemon=True),
            threading.Thread(target=self._receive_loop, name="heartbeat-receive", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def loop_ticked(self) -> None:
        """Called from the event loop each interval: it is still turning."""
        self._loop_tick = time.monotonic()

    def silence(self, silent: bool) -> None:
        self._silent = silent

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=1.0)
        self._sock.close()

    def _send_loop(self) -> None:
        seq = time.time_ns() // 1000
        while not self._stop.wait(self._interval):
            if time.monotonic() - self._loop_tick > self._stall:
                continue  # the event loop is wedged: let peers see this node fail
            if self._silent:
                continue  # stepping down (`Link.silence`)
            layers, requests = self._local_state()
            seq += 1
            beat = Heartbeat(self._src.node, Epoch(0), seq, time.monotonic(), layers, requests)
            data = encode_beat(self._src, beat)
            for address in list(self._peers.values()):  # members may change meanwhile
                try:
                    self._sock.sendto(data, address)
                except OSError as e:
                    log.debug("heartbeat to %s failed: %s", address, e)

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self._sock.recvfrom(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                sender, beat = decode_beat(self._src, data)
            except WireFormatError as e:
                log.debug("dropped a datagram: %s", e)
                continue
            if sender not in self._peers or beat.seq <= self._last_seq.get(sender, -1):
                continue
            self._last_seq[sender] = beat.seq
            self._on_beat(sender, beat)
