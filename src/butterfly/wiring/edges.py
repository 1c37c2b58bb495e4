"""A node's edges: what it reaches the world through, injected into `node.build_node`.

The network edges (TCP or mutual TLS between nodes, heartbeats over UDP, the real clock,
facts measured on this machine) are built here from the config; in one process,
`butterfly.testing.inprocess` gives the in-memory transport, a heartbeat hub, a fake clock
and fixed facts, so whole nodes (recovery and eviction included) run in a unit test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from opentelemetry.sdk.trace.export import SpanExporter

from butterfly.config import ButterflyConfig
from butterfly.config.gateways import gateway_nodes
from butterfly.config.roster import addresses
from butterfly.config.schema import NetworkConfig
from butterfly.control.facts import FactProbe, Probe
from butterfly.control.heartbeats import BeatSource, HeartbeatLink
from butterfly.control.membership import Link
from butterfly.metrics.events import Emit
from butterfly.metrics.tracing import otlp_exporter
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.net.tls import TlsFiles, contexts
from butterfly.net.transport import Transport
from butterfly.runtime.loader import layer_infos
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.control import Heartbeat
from butterfly.wiring.parts import precision_of

LocalState = Callable[[], tuple[tuple[int, ...], int]]
OnBeat = Callable[[NodeId, Heartbeat], None]


log = logging.getLogger(__name__)


class Edges(Protocol):
    def clock(self) -> float:
        """Monotonic seconds, for the failure detector."""

    def transport(self, identity: Identity, emit: Emit, epoch: Callable[[], Epoch]) -> Transport:
        """The node's transport; `epoch` is stamped on every frame it sends."""

    def heartbeats(
        self,
        source: BeatSource,
        local_state: LocalState,
        on_beat: OnBeat,
        members: Mapping[NodeId, str],
    ) -> Link:
        """The heartbeat link: sends `local_state()` to `members` (the roster's, read on
        every beat), hands peers' beats to `on_beat`."""

    def probe(
        self, node: NodeId, peers: Sequence[NodeId], transport: Transport, torch: TorchThread
    ) -> Probe:
        """Measures (once) the facts this node reports to the gateway."""

    def spans(self) -> SpanExporter | None:
        """Where this node's trace spans go (None: nowhere, whatever tracing says)."""


def parse_address(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def transport_limits(net: NetworkConfig) -> TransportLimits:
    """The transport's limits from the `network` options (milliseconds to seconds): one
    function, so a test of an option's effect builds its transport as a node does."""
    return TransportLimits(
        max_frame_bytes=net.max_frame_bytes,
        max_message_bytes=net.max_message_bytes,
        connect_timeout_s=net.connect_timeout_ms / 1000,
        connect_attempts=net.retry_attempts,
        retry_backoff_s=net.retry_backoff_ms / 1000,
        retry_max_backoff_s=net.retry_max_backoff_ms / 1000,
        compression="" if net.compression == "none" else net.compression,
        compression_min_bytes=net.compression_min_bytes,
        send_timeout_s=net.send_timeout_ms / 1000,
        max_connections=net.max_connections,
    )


class NetworkEdges:
    """The real edges of a node process, from its config."""

    def __init__(self, cfg: ButterflyConfig, model_dir: Path) -> None:
        self._cfg, self._model_dir = cfg, model_dir
        self._members = addresses(cfg)  # at start; the node's roster follows changes

    def clock(self) -> float:
        return time.monotonic()

    def transport(self, identity: Identity, emit: Emit, epoch: Callable[[], Epoch]) -> Transport:
        cfg = self._cfg
        net, tls = cfg.network, cfg.security.tls
        return TcpTransport(
            identity=identity,
            listen=parse_address(cfg.node.listen),
            peers={n: parse_address(a) for n, a in self._members.items()},
            emit=emit,
            epoch=epoch,
            limits=transport_limits(net),
            tls=contexts(TlsFiles(Path(tls.ca), Path(tls.cert), Path(tls.key)))
            if tls.enabled
            else None,
        )

    def heartbeats(
        self,
        source: BeatSource,
        local_state: LocalState,
        on_beat: OnBeat,
        members: Mapping[NodeId, str],
    ) -> Link:
        cfg = self._cfg
        return HeartbeatLink(
            source,
            listen=parse_address(cfg.node.listen),
            peers=_Addresses(members, source.node),
            interval_s=cfg.coordination.heartbeat_interval_ms / 1000,
            local_state=local_state,
            on_beat=on_beat,
        )

    def probe(
        self, node: NodeId, peers: Sequence[NodeId], transport: Transport, torch: TorchThread
    ) -> Probe:
        # measured when the gateway first asks (one node at a time; see control.facts)
        return FactProbe(
            node=node,
            peers=peers,
            transport=transport,
            memory_limit_bytes=self._cfg.resources.memory_limit_bytes,
            model_dir=self._model_dir,
            torch_thread=torch,
            compute_seconds=self._cfg.partition.compute_probe_s,
            reserved_bytes=draft_model_bytes(self._cfg, node),
        )

    def spans(self) -> SpanExporter | None:
        return otlp_exporter(self._cfg.observability.otlp_endpoint)


def draft_model_bytes(cfg: ButterflyConfig, node: NodeId) -> int:
    """The weights a gateway-capable node loads to draft with (generation.speculative
    .draft_model), sized as the loader sizes stages (`runtime.loader.layer_infos`, any
    family) at the model's dtype and quantization, which the drafter loads it at: the
    planner must not count them as room for layers, since any such node may come to act
    as the gateway. 0 elsewhere, or (logged) when the checkpoint cannot be sized."""
    path = cfg.generation.speculative.draft_model
    if not path or node not in gateway_nodes(cfg):
        return 0
    try:
        return sum(info.memory_bytes for info in layer_infos(Path(path), precision_of(cfg)))
    except (ButterflyError, OSError, ValueError, KeyError, TypeError, ArithmeticError) as e:
        log.warning(
            "draft model %s not sized (%s: %s): no memory kept back for it",
            path,
            type(e).__name__,
            e,
        )
        return 0


class _Addresses(Mapping[NodeId, tuple[str, int]]):
    """The roster's peers as socket addresses, read through on every use."""

    def __init__(self, members: Mapping[NodeId, str], me: NodeId) -> None:
        self._members, self._me = members, me

    def __getitem__(self, node: NodeId) -> tuple[str, int]:
        if node == self._me:
            raise KeyError(node)
        return parse_address(self._members[node])

    def __iter__(self) -> Iterator[NodeId]:
        return iter([n for n in list(self._members) if n != self._me])

    def __len__(self) -> int:
        return sum(1 for _ in self)


__all__ = [
    "Edges",
    "NetworkEdges",
    "Probe",
    "draft_model_bytes",
    "parse_address",
    "transport_limits",
]
