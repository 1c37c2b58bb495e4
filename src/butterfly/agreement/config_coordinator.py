"""The gateway's side of cluster-wide config: PROPOSE, collect PREPAREs, COMMIT, FINALIZE.

A change that touches dynamic-consensus keys goes through every node before anything
applies anywhere: the gateway asks each node to PREPARE (validate, ask its subscribers)
and waits for every node it believes alive. One REJECT, or fewer than 2f+1 OKs in time,
ends it there: nothing was applied, and the error names the node and its reason. With
2f+1 signed OKs the gateway orders a `ConfigUpdate` through PBFT; every node applies it
when the agreement executes it, at the config sequence number the command carries, never
at a wall-clock time. If ordering times out, the gateway orders a `ConfigAbort` for that
attempt: whichever of the two executes first decides, identically on every node, so a
timeout never leaves the cluster split. Dynamic-local keys in the same patch apply on
the gateway, after the cluster part committed; its components check the whole change
before anything is ordered, so their veto of the local part applies nothing anywhere.
The gateway's role options the request names (its API, queue, generation and tracing
options) go to the standby gateways too, which enforce them once they take over
(`gateway_options`), also when they are in force on the gateway already: that is how a
standby that missed them gets them.

Where every node stands (for FINALIZE, `/health` and `sync`) is `config_status`'s job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from butterfly.agreement.config_replica import Applied, ConfigReplica, NotApplied
from butterfly.agreement.config_status import ClusterConfigStatus, NodeConfig
from butterfly.agreement.config_votes import valid_vote
from butterfly.agreement.gateway_options import ALREADY, tell_standbys
from butterfly.config import ButterflyConfig, Proposal, UpdateRefused, UpdateResult, apply_patch
from butterfly.config.fields import flatten
from butterfly.config.gateways import gateway_nodes, gateway_role_values
from butterfly.config.proposal import Kind, classify, propose_change, restart_required
from butterfly.config.reload import rollback_target
from butterfly.config.versions import Change, canonical_json, diff_configs
from butterfly.net.transport import Transport
from butterfly.protocol.quorum import quorum
from butterfly.types.errors import ButterflyError, ConfigError, ConsensusTimeout
from butterfly.types.ids import NodeId
from butterfly.types.wire.commands import ConfigAbort, ConfigUpdate, encode_command
from butterfly.types.wire.control import ConfigPrepare, ConfigVote

log = logging.getLogger(__name__)

Propose = Callable[[bytes, float], Awaitable[int]]
"""Order a command; returns its agreement sequence number (`AgreementDriver.propose`)."""
FINALIZE_S = 2.0


class ConfigRejected(UpdateRefused):
    """A node voted REJECT in PREPARE: nothing was applied anywhere."""

    def __init__(self, node: NodeId, reason: str) -> None:
        super().__init__(f"node {node} rejected the change: {reason}")
        self.node, self.reason = node, reason


class ConfigTimeout(ConfigError):
    """The change was not agreed in time; the message says whether it was rolled back."""

    retriable = True
    fatal = False


@dataclass(frozen=True)
class ChangeResult:
    """What a change did: `seq` 0 when it was node-local only; `nodes` from FINALIZE."""

    seq: int
    version: int
    config_hash: str
    cluster_hash: str
    changes: tuple[Change, ...]
    nodes: Mapping[int, str] = field(default_factory=dict)


class ConfigCoordinator:
    def __init__(
        self,
        *,
        replica: ConfigReplica,
        transport: Transport,
        propose: Propose,
        members: tuple[NodeId, ...],
        f: int,
        live: Callable[[NodeId], bool],
        timeout_s: float,
    ) -> None:
        self.replica, self._transport, self._propose = replica, transport, propose
        self._members, self._f, self._live, self._timeout = members, f, live, timeout_s
        self.me = replica.node
        self._peers = tuple(n for n in members if n != self.me)
        self.status = ClusterConfigStatus(replica=replica, transport=transport, members=members)

    def follow(self, members: tuple[NodeId, ...]) -> None:
        """An agreed membership change: the next PREPARE goes to the members now, and its
        quorum counts them."""
        self._members = members
        self._peers = tuple(n for n in members if n != self.me)
        self.status.members = members

    def retune(self, timeout_s: float) -> None:
        """A changed coordination.config_update_timeout_ms: the next update's deadline."""
        self._timeout = timeout_s

    # --- changes ------------------------------------------------------------------------

    async def update(self, patch: Mapping[str, Any], *, reason: str = "") -> ChangeResult:
        """Apply dotted or nested `patch`: cluster-wide keys by agreement, local ones here,
        and the gateway's role options it names on the standby gateways too, even those in
        force here already (how a standby that missed them gets them)."""
        current = self.replica.manager.current
        target = apply_patch(current, patch, "api")
        named = tuple(flatten(patch))
        return await self._change(current, target, "update", reason or "api update", named)

    async def rollback(self, version: int, *, reason: str = "") -> ChangeResult:
        """Go back to the run-time settings of this gateway's history `version`, as a new
        agreed version. Static options stay as they are: they changed by a restart (new
        ports of a restarted local cluster, say) and only a restart changes them back. The
        roster stays too (`config.roster.ROSTER_KEYS`): an earlier one would reuse a
        removed id or drop an added member, which every node refuses, so any rollback to
        before a membership change would fail."""
        manager = self.replica.manager
        then = manager.history.config_at(version)
        target = rollback_target(manager.current, then, keep_static=True)
        why = reason or f"rollback to version {version}"
        return await self._change(manager.current, target, "rollback", why)

    async def _change(
        self,
        current: ButterflyConfig,
        target: ButterflyConfig,
        kind: Kind,
        reason: str,
        named: tuple[str, ...] = (),
    ) -> ChangeResult:
        """Move from `current` to `target`; `named`: the options the request set, whose
        role values the standbys are sent whether or not they change anything here."""
        parts = classify(diff_configs(current, target))
        if parts.static:
            raise restart_required(parts.static)
        role = gateway_role_values(target, (*named, *(c.key for c in parts.local)))
        if not parts.consensus and not parts.local:
            return await self._standbys_only(role)
        if parts.local:
            # every check on the whole change first: a veto of the local part, raised after
            # the cluster part committed, was a refusal that had changed the cluster
            self.replica.manager.check(target)
        agreed = None
        if parts.consensus:
            cluster_part = {c.key: c.new for c in parts.consensus}
            proposed = apply_patch(current, cluster_part, "api") if parts.local else target
            agreed = await self._agree(propose_change(current, proposed, kind=kind, reason=reason))
        local = self._apply_local(parts.local, kind, agreed) if parts.local else None
        told = await self._tell_standbys(role)
        return self._result(agreed, local, told)

    def _apply_local(
        self, local: tuple[Change, ...], kind: Kind, agreed: ChangeResult | None
    ) -> UpdateResult:
        """The node-local part, here. Refused after the cluster part committed (a check
        passed beforehand, then the config moved, or a component failed to apply it), the
        answer says the cluster part stands."""
        try:
            return self.replica.manager.update({c.key: c.new for c in local}, source=f"api {kind}")
        except ConfigError as e:
            if agreed is None:
                raise
            raise UpdateRefused(
                f"the cluster-wide changes committed (config seq {agreed.seq}); the "
                f"gateway-local ones were refused: {e}"
            ) from e

    def _result(
        self, agreed: ChangeResult | None, local: UpdateResult | None, told: Mapping[int, str]
    ) -> ChangeResult:
        """One report of a change: the agreed part's, the local part's, and the standbys'
        states beside the cluster part's report of them, when there is one."""
        nodes = dict(agreed.nodes) if agreed else {int(self.me): "applied"}
        for node, state in told.items():
            nodes[node] = (
                f"{nodes.get(node, 'not reported')}; gateway options {state}" if agreed else state
            )
        if local is None:
            if agreed is None:  # unreachable: `_change` runs one of the two parts at least
                raise UpdateRefused("the change does nothing")
            return dataclasses.replace(agreed, nodes=nodes)
        return ChangeResult(
            agreed.seq if agreed else 0,
            local.version,
            local.config_hash,
            self.replica.manager.record.cluster_hash,
            (agreed.changes if agreed else ()) + local.applied,
            nodes,
        )

    async def _standbys_only(self, role: Mapping[str, Any]) -> ChangeResult:
        """Nothing changes here: the request's role options still go to the standbys,
        which may lack them (one unreachable when they were changed kept its own; before,
        it could never be given them: "the change does nothing"). Refused only when every
        standby had them too."""
        told = await self._tell_standbys(role)
        if all(state == ALREADY for state in told.values()):
            where = " (on the standby gateways too)" if told else ""
            raise UpdateRefused(f"the change does nothing: every value is already in force{where}")
        rec = self.replica.manager.record
        nodes = {int(self.me): ALREADY, **told}
        return ChangeResult(0, rec.version, rec.config_hash, rec.cluster_hash, (), nodes)

    async def _tell_standbys(self, role: Mapping[str, Any]) -> dict[int, str]:
        """The other gateway-capable nodes adopt the role options the change named
        (`gateway_options`): before, a token required through the API was gone as soon as
        a standby took over, serving with its own file's values."""
        standbys = [n for n in gateway_nodes(self.replica.manager.current) if n != self.me]
        return await tell_standbys(self._transport, standbys, role, self._timeout)

    async def _agree(self, proposal: Proposal) -> ChangeResult:
        started = time.monotonic()
        deadline = started + self._timeout
        body = canonical_json(proposal.to_wire())
        digest = proposal.digest
        voters = self._peers  # a member this change adds is not running it yet
        votes = await self._prepare(digest, body, deadline)
        prepared = time.monotonic()
        nonce = secrets.randbits(62)
        update = ConfigUpdate(
            proposal=body,
            seq=max(v.last_seq for v in votes) + 1,
            nonce=nonce,
            vote_nodes=tuple(v.node for v in votes),
            vote_seqs=tuple(v.last_seq for v in votes),
            vote_signatures=tuple(v.signature for v in votes),
        )
        outcome = self.replica.expect(nonce)
        try:
            await self._order(update, digest, deadline)
            if not outcome.done():  # executing it failed here unexpectedly (logged)
                raise ConfigTimeout("the change was ordered but its outcome here is unknown")
            result = outcome.result()
        finally:
            self.replica.forget(nonce)
        if isinstance(result, NotApplied):
            if result.aborted:
                raise ConfigTimeout(
                    f"not committed within {self._timeout:.1f} s; rolled back on every node"
                )
            raise UpdateRefused(f"the cluster did not apply the change: {result.reason}")
        committed = time.monotonic()
        nodes = await self._finalize(result, deadline + FINALIZE_S, voters)
        log.info(
            "config seq %d in %.1f ms (prepare %.1f, commit %.1f, finalize %.1f): %s",
            result.seq,
            (time.monotonic() - started) * 1000,
            (prepared - started) * 1000,
            (committed - prepared) * 1000,
            (time.monotonic() - committed) * 1000,
            proposal.keys,
        )
        return ChangeResult(
            result.seq, result.version, result.config_hash, result.cluster_hash,
            result.changes, nodes,
        )  # fmt: skip

    async def _prepare(self, digest: str, body: bytes, deadline: float) -> list[ConfigVote]:
        """PREPARE on every node; the OK votes, or why the change stops here."""
        keys = self.replica.keys
        asks = {
            asyncio.create_task(self._ask_vote(peer, digest, body, deadline)): peer
            for peer in self._peers
        }
        silent: list[NodeId] = []
        try:
            await asyncio.sleep(0)  # the PREPAREs leave first; this node votes meanwhile
            mine = self.replica.vote(digest, body)
            if not mine.ok:
                raise ConfigRejected(self.me, mine.reason)
            oks: list[ConfigVote] = [mine]
            need = quorum(len(self._members), self._f)
            pending = set(asks)
            while pending:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    vote = task.result()
                    if vote is None:
                        silent.append(asks[task])
                    elif not vote.ok:
                        raise ConfigRejected(asks[task], vote.reason)
                    elif valid_vote(vote, digest, keys) and vote.node == asks[task]:
                        oks.append(vote)
                    else:
                        silent.append(asks[task])  # a forged or misdirected OK counts as none
                waiting = [asks[t] for t in pending]
                if len(oks) >= need and not any(self._live(p) for p in waiting):
                    break  # everyone alive has answered
        finally:
            for task in asks:
                task.cancel()
        if len(oks) < need:
            raise ConfigTimeout(
                f"only {len(oks)} of {len(self._members)} nodes voted OK in time "
                f"({need} needed; no answer from {sorted(map(int, silent))}); "
                "nothing was applied"
            )
        return oks

    async def _ask_vote(
        self, peer: NodeId, digest: str, body: bytes, deadline: float
    ) -> ConfigVote | None:
        try:
            vote, _ = await self._transport.ask(
                peer,
                ConfigPrepare(digest),
                body,
                timeout=max(0.01, deadline - time.monotonic()),
                channel="control",
            )
        except ButterflyError as e:
            log.info("node %s did not vote on config %s: %s", peer, digest[:12], e)
            return None
        return vote

    async def _order(self, update: ConfigUpdate, digest: str, deadline: float) -> None:
        """COMMIT through PBFT; on a timeout, order the abort so the outcome is the same
        everywhere (the update may still have won the race: then it stands)."""
        try:
            await self._propose(encode_command(update), max(0.01, deadline - time.monotonic()))
            return
        except ConsensusTimeout:
            log.warning("config %s not committed in time; ordering its abort", digest[:12])
        try:
            await self._propose(encode_command(ConfigAbort(digest, update.nonce)), self._timeout)
        except ConsensusTimeout:
            raise ConfigTimeout(
                f"not committed within {self._timeout:.1f} s and the rollback could not be "
                "ordered either (no quorum): the change applies everywhere or nowhere once "
                "the cluster recovers; see GET /api/v1/config"
            ) from None

    async def _finalize(
        self, result: Applied, deadline: float, peers: tuple[NodeId, ...]
    ) -> dict[int, str]:
        """FINALIZE: which of `peers` (the members when it was proposed) report the new
        cluster hash (polled until `deadline`)."""
        nodes = {int(self.me): "applied"}
        todo = set(peers)
        while todo:
            statuses = await asyncio.gather(*(self.status.node(p) for p in sorted(todo)))
            for s in statuses:
                if s.reachable and s.failed_seq >= result.seq:
                    nodes[s.node] = f"diverged: {s.error}"
                    todo.discard(s.node)
                elif s.reachable and s.seq >= result.seq:
                    at_target = s.cluster_hash == result.cluster_hash or s.seq > result.seq
                    nodes[s.node] = "applied" if at_target else f"diverged: {s.error}"
                    todo.discard(s.node)
                elif not s.reachable and not self._live(s.node):
                    nodes[s.node] = "unreachable"
                    todo.discard(s.node)
                else:
                    nodes[s.node] = "behind" if s.reachable else "unreachable"
            if not todo or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.005)
        return dict(sorted(nodes.items()))

    # --- status, health, sync (see config_status) -------------------------------------

    async def cluster_status(self) -> list[NodeConfig]:
        return await self.status.poll()

    def reference_hash(self, statuses: list[NodeConfig]) -> str:
        return self.status.reference_hash(statuses)

    def health(self) -> dict[str, Any]:
        return self.status.health()

    async def monitor(self) -> None:
        await self.status.monitor()

    async def sync(self) -> dict[int, str]:
        return await self.status.sync()


__all__ = [
    "ChangeResult",
    "ConfigCoordinator",
    "ConfigRejected",
    "ConfigTimeout",
]
