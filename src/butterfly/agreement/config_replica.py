"""One node's part in a cluster-wide config change (seed 002): vote, apply, report, sync.

    PROPOSE   the gateway builds a `Proposal` (config/proposal.py)
    PREPARE   `vote`: this node validates it against its own config and asks its
              subscribers (`ConfigManager.prepare`), and answers a signed OK or a REJECT
    COMMIT    the gateway orders a `ConfigUpdate` carrying 2f+1 signed OKs through PBFT;
              `execute` runs on every node when the agreement executes it, in the same
              order everywhere, and applies it at the config sequence number it names
    FINALIZE  `status` lets the gateway confirm each node reached the new cluster hash

Every decision in `execute` is a function of the ordered command and the node's config
position, so honest nodes at the same position decide alike: a stale proposal (another
change committed first), an aborted attempt or a missing certificate is refused
everywhere. Only a subscriber that refuses after the cluster committed makes one node
differ; it keeps its old config, reports `error`, shows a different cluster hash, and
`sync` (adopting what f+1 peers agree on) repairs it.

A restarted node replays the agreement log from the start of the run: changes at or
below its position (it resumed from its history) are recognised and skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from butterfly.agreement.config_votes import certificate_problem, make_vote
from butterfly.agreement.gateway_options import adopt
from butterfly.config import ConfigManager, Proposal, UpdateRefused, UpdateRejected
from butterfly.config.fields import config_leaves, field_specs
from butterfly.config.schema import ButterflyConfig, Scope
from butterfly.config.versions import Change, canonical_json
from butterfly.net.framing import Envelope
from butterfly.net.transport import Transport
from butterfly.protocol.quorum import weak_quorum
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import ButterflyError, ConfigError
from butterfly.types.ids import GATEWAY, NodeId
from butterfly.types.wire.commands import MAX_COMMAND_BYTES, ConfigAbort, ConfigUpdate
from butterfly.types.wire.control import (
    ConfigLocal,
    ConfigPrepare,
    ConfigStatus,
    ConfigStatusQuery,
    ConfigSync,
    ConfigVote,
)
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)
SYNC_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Applied:
    """The change is in force here at config sequence `seq` (or already was: a replay)."""

    seq: int
    version: int
    config_hash: str
    cluster_hash: str
    changes: tuple[Change, ...]


@dataclass(frozen=True)
class NotApplied:
    """Nothing changed here; `aborted` when the attempt's abort was ordered first."""

    reason: str
    aborted: bool = False


Outcome = Applied | NotApplied


def parse_proposal(body: bytes, digest: str) -> Proposal:
    """A peer's proposal bytes, which must be the canonical JSON whose sha256 is `digest`."""
    if len(body) > MAX_COMMAND_BYTES:
        raise UpdateRefused(f"proposal of {len(body)} bytes is over {MAX_COMMAND_BYTES}")
    if hashlib.sha256(body).hexdigest() != digest:
        raise UpdateRefused("proposal bytes do not match their digest")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise UpdateRefused(f"proposal is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise UpdateRefused("proposal must be a JSON object")
    proposal = Proposal.from_wire(data)
    if proposal.digest != digest:
        raise UpdateRefused("proposal is not in canonical form")
    return proposal


def cluster_values(cfg: ButterflyConfig) -> dict[str, Any]:
    """The options every node must agree on, by dotted key (what `sync` copies)."""
    specs = field_specs()
    return {k: v for k, v in config_leaves(cfg).items() if specs[k].scope is Scope.CLUSTER}


class ConfigReplica:
    def __init__(
        self,
        *,
        node: NodeId,
        manager: ConfigManager,
        key: SigningKey,
        keys: tuple[bytes, ...],
        f: int,
        transport: Transport,
        gateway: Callable[[], NodeId] = lambda: GATEWAY,
    ) -> None:
        """`gateway`: the one node whose PREPAREs this node votes on (the API, and its
        token check, are there): the acting gateway as agreed, read on every vote."""
        self.node, self.manager, self._key, self._keys, self._f = node, manager, key, keys, f
        self._gateway = gateway
        self._transport = transport
        self._peers = tuple(NodeId(i) for i, k in enumerate(keys) if k and i != node)
        self._aborted: set[int] = set()  # nonces of attempts rolled back before they ran
        self._expected: dict[int, asyncio.Future[Outcome]] = {}
        self.error = ""  # why the last agreed change failed here (subscriber veto), or ""
        self.failed_seq = 0  # the config seq of that change

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def follow(self, slots: tuple[bytes, ...]) -> None:
        """An agreed membership change (`config.roster.Roster`): the next certificate is
        checked against the new members' keys, and sync asks them."""
        self._keys = slots
        self._peers = tuple(NodeId(i) for i, k in enumerate(slots) if k and i != self.node)

    @property
    def last_seq(self) -> int:
        return self.manager.history.last_cluster_seq()

    async def on_message(self, peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
        """The node's router hands over config messages with the peer the connection
        authenticated; the reply answers the request."""
        msg = env.msg
        match msg:
            case ConfigPrepare():
                gateway = self._gateway()
                if peer != gateway:  # a signed OK is half a commit: never for others
                    log.warning("node %s asked for a config vote; only the gateway may", peer)
                    reason = f"config changes are proposed by the gateway (node {gateway})"
                    return make_vote(self._key, self.node, msg.digest, self.last_seq,
                                     ok=False, reason=reason), b""  # fmt: skip
                return self.vote(msg.digest, env.payload), b""
            case ConfigStatusQuery():
                return self.status(msg.values)
            case ConfigSync():
                return await self.sync(), b""
            case ConfigLocal():  # the router took it from the acting gateway only
                return self.adopt_gateway_role(env.payload)
        return None

    def adopt_gateway_role(self, body: bytes) -> tuple[ConfigStatus, bytes]:
        """Take the acting gateway's options of the gateway's role (`gateway_options`):
        the answer's payload lists the keys that changed here (none: they were in force
        already), its `error` what was refused (only that: a diverged node's error from
        an agreed change is no refusal of these)."""
        changed, error = adopt(self.manager, body)
        return dataclasses.replace(self.status()[0], error=error), canonical_json(changed)

    # --- PREPARE ----------------------------------------------------------------------

    def vote(self, digest: str, body: bytes) -> ConfigVote:
        """OK (signed, with this node's config position) or REJECT with the reason."""
        last = self.last_seq
        try:
            verdict = self.manager.prepare(parse_proposal(body, digest))
        except ConfigError as e:
            return make_vote(self._key, self.node, digest, last, ok=False, reason=str(e))
        return make_vote(self._key, self.node, digest, last, ok=verdict.ok, reason=verdict.reason)

    # --- COMMIT -----------------------------------------------------------------------

    def expect(self, nonce: int) -> asyncio.Future[Outcome]:
        """The outcome of attempt `nonce` here, once the agreement executes it (or its abort)."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._expected[nonce] = fut
        return fut

    def forget(self, nonce: int) -> None:
        self._expected.pop(nonce, None)

    def execute(self, command: ConfigUpdate | ConfigAbort) -> Outcome:
        """Run an agreed config command; called in agreement order on every node."""
        if isinstance(command, ConfigAbort):
            self._aborted.add(command.nonce)
            outcome: Outcome = NotApplied(
                "rolled back: the change did not commit in time and its abort was ordered first",
                aborted=True,
            )
        else:
            outcome = self._commit(command)
        waiter = self._expected.pop(command.nonce, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)
        return outcome

    def _commit(self, update: ConfigUpdate) -> Outcome:
        started = time.perf_counter()
        digest = hashlib.sha256(update.proposal).hexdigest()
        if update.nonce in self._aborted:
            return NotApplied("rolled back: its abort was ordered first", aborted=True)
        problem = certificate_problem(update, digest, self._keys, self._f)
        if problem:
            log.warning("refusing agreed config change %s: %s", digest[:12], problem)
            return NotApplied(f"no valid PREPARE certificate: {problem}")
        try:
            proposal = parse_proposal(update.proposal, digest)
        except UpdateRefused as e:
            return NotApplied(str(e))
        last = self.last_seq
        if update.seq <= last:  # a replay after a restart, or a diverged position
            done = self.manager.history.by_cluster_seq(update.seq)
            if done is not None and done.cluster_hash == proposal.new_cluster_hash:
                rec = self.manager.record
                return Applied(update.seq, rec.version, rec.config_hash, rec.cluster_hash, ())
            return NotApplied(
                f"stale: config sequence {update.seq} already holds another change here "
                f"(position {last}); a concurrent change committed first, retry on top of it"
            )
        try:
            result = self.manager.apply_committed(proposal, update.seq)
        except UpdateRejected as e:
            self.error, self.failed_seq = str(e), update.seq
            log.error("agreed config change refused here, node diverges until sync: %s", e)
            return NotApplied(str(e))
        except ConfigError as e:
            return NotApplied(str(e))
        self.error, self.failed_seq = "", 0
        rec = self.manager.record
        took = (time.perf_counter() - started) * 1000
        log.info(
            "config seq %d applied in %.1f ms: version %d, %s",
            update.seq,
            took,
            rec.version,
            proposal.keys,
        )
        return Applied(update.seq, rec.version, rec.config_hash, rec.cluster_hash, result.applied)

    # --- FINALIZE and health ------------------------------------------------------------

    def status(self, values: bool = False) -> tuple[ConfigStatus, bytes]:
        rec = self.manager.record
        payload = canonical_json(cluster_values(self.manager.current)) if values else b""
        reply = ConfigStatus(
            self.node,
            rec.version,
            rec.config_hash,
            rec.cluster_hash,
            self.last_seq,
            self.error,
            self.failed_seq,
        )
        return reply, payload

    # --- sync -----------------------------------------------------------------------------

    async def sync(self) -> ConfigStatus:
        """Adopt the cluster-scoped config that f+1 peers report alike (so at least one honest
        node vouches for it); the answer's `error` says why not, if it did not."""
        try:
            await self._sync()
        except ConfigError as e:
            log.warning("config sync failed: %s", e)
            return dataclasses.replace(self.status()[0], error=f"sync: {e}")
        return self.status()[0]

    async def _sync(self) -> None:
        answers = await asyncio.gather(*(self._ask(p) for p in self._peers))
        groups: dict[tuple[str, int], list[bytes]] = {}
        for answer in answers:
            if answer is not None:
                status, payload = answer
                groups.setdefault((status.cluster_hash, status.seq), []).append(payload)
        eligible = [k for k, v in groups.items() if len(v) >= weak_quorum(self._f)]
        if not eligible:
            raise UpdateRefused(f"no {weak_quorum(self._f)} peers agree on a cluster config")
        target_hash, seq = max(eligible, key=lambda k: (len(groups[k]), k[1]))
        if (self.manager.record.cluster_hash, self.last_seq) == (target_hash, seq):
            self.error, self.failed_seq = "", 0
            return
        problem: Exception | None = None
        for payload in groups[(target_hash, seq)]:
            try:
                values = json.loads(payload)
                if not isinstance(values, Mapping):
                    raise UpdateRefused("peer sent config values that are not an object")
                self.manager.sync_to(values, seq=seq, expected_hash=target_hash)
            except (ValueError, UpdateRefused) as e:  # a liar's values fail the hash check
                problem = e
                continue
            self.error, self.failed_seq = "", 0
            log.info("config synced to cluster seq %d (%s)", seq, target_hash[:12])
            return
        raise UpdateRefused(f"no peer's values could be adopted: {problem}")

    async def _ask(self, peer: NodeId) -> tuple[ConfigStatus, bytes] | None:
        try:
            status, values = await self._transport.ask(
                peer, ConfigStatusQuery(values=True), timeout=SYNC_TIMEOUT_S, channel="control"
            )
        except ButterflyError as e:
            log.debug("node %s did not report its config: %s", peer, e)
            return None
        return (status, values) if status.node == peer else None


__all__ = [
    "Applied",
    "ConfigReplica",
    "NotApplied",
    "Outcome",
    "cluster_values",
    "parse_proposal",
]
