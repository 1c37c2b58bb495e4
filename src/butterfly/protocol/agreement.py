"""The seed's `ByzantineAgreement` API as a thin facade over one PBFT replica.

The specification (seed 000) counts PRE-PREPARE, PREPARE and COMMIT votes by node id.
Here every vote becomes a signed PBFT message fed to `pbft.step`, so the quorum rules,
signature checks and equivocation evidence are PBFT's own, not a second implementation.
Because the seed's calls name voters by id only, the facade holds the voters' keys; in a
cluster each vote arrives signed from its node and goes to `pbft.step` directly.

`n >= 3f + 1` is enforced: `ByzantineAgreement(5, 2)` raises `InsufficientNodes` saying
5 nodes tolerate at most f=1 and f=2 needs 7.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from butterfly.protocol import pbft
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState, Send, prepared_digest
from butterfly.protocol.quorum import check_fault_tolerance, primary
from butterfly.protocol.sign import SigningKey, sign_message, verify_message
from butterfly.types.errors import ByzantineViolation, InvalidMessage, PhaseTransitionFailed
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Commit, Evidence, Prepare, PrePrepare, Proof, Request


@dataclass(frozen=True, slots=True)
class AgreementValue:
    """The value agreed on (the seed's `InferenceResult`): an epoch and a result payload."""

    epoch: Epoch
    data: tuple[int, ...]

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb([int(self.epoch), list(self.data)])
        return packed

    @classmethod
    def from_bytes(cls, raw: bytes) -> AgreementValue:
        try:
            epoch, data = msgpack.unpackb(raw)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise InvalidMessage(f"agreement value is not [epoch, data]: {e}") from e
        if type(epoch) is not int or type(data) is not list:
            raise InvalidMessage("agreement value must be [int epoch, list of int]")
        if any(type(v) is not int for v in data):
            raise InvalidMessage("agreement value data must be integers")
        return cls(Epoch(epoch), tuple(data))

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()


class ByzantineAgreement:
    """One agreement instance seen from `node` (by default the primary of view 0)."""

    def __init__(
        self,
        n: int,
        f: int,
        *,
        node: NodeId = NodeId(0),  # noqa: B008  (a NewType: no call at run time)
        keys: Sequence[SigningKey] | None = None,
    ) -> None:
        check_fault_tolerance(n, f)
        self.keys = list(keys) if keys is not None else [SigningKey.generate() for _ in range(n)]
        if len(self.keys) != n:
            raise ValueError(f"{len(self.keys)} keys for {n} nodes")
        self.node = node
        config = PbftConfig(
            replica=node,
            keys=tuple(k.public for k in self.keys),
            f=f,
            clients={node: self.keys[node].public},  # the proposing node is the client
        )
        self.state: ReplicaState = pbft.new_replica(config, self.keys[node])
        self.sent: list[Send] = []  # what the replica wants delivered to its peers
        self._value: AgreementValue | None = None
        self._pre_prepare: PrePrepare | None = None

    def _feed(self, message: pbft.Input) -> None:
        self.state, out = pbft.step(self.state, message, 0.0)
        self.sent.extend(out)

    def handle_pre_prepare(self, value: AgreementValue, proof: Proof) -> None:
        """Propose `value`, backed by the signed proof of the step that produced it."""
        if not 0 <= proof.sender < len(self.keys) or not verify_message(
            proof, self.keys[proof.sender].public
        ):
            raise ByzantineViolation(
                f"the proof for this value is not validly signed by node {proof.sender}; "
                "refusing to propose it",
                blame=proof.sender,
            )
        if primary(self.state.view, self.state.config.n) != self.node:
            raise PhaseTransitionFailed(f"node {self.node} is not the primary of this view")
        request = sign_message(
            Request(
                sender=self.node,
                epoch=self.state.config.epoch,
                timestamp=len(self.state.replies) + len(self.state.pending) + 1,
                operation=value.to_bytes(),
            ),
            self.keys[self.node],
        )
        before = len(self.sent)
        self._feed(request)
        proposals = [s.message for s in self.sent[before:] if isinstance(s.message, PrePrepare)]
        if not proposals:
            raise PhaseTransitionFailed("the replica did not order the value (window full?)")
        self._value, self._pre_prepare = value, proposals[0]

    def _ballot(self, value_hash: bytes) -> tuple[PrePrepare, bytes]:
        """The proposal voted on, and the digest a vote for `value_hash` carries."""
        if self._value is None or self._pre_prepare is None:
            raise PhaseTransitionFailed("no value proposed yet: call handle_pre_prepare first")
        if value_hash == self._value.hash:
            return self._pre_prepare, self._pre_prepare.digest
        return self._pre_prepare, hashlib.sha256(value_hash).digest()  # some other value

    def _voter(self, node: NodeId) -> SigningKey:
        if not 0 <= node < len(self.keys):
            raise InvalidMessage(f"node {node} is not one of the {len(self.keys)} members")
        return self.keys[node]

    def record_prepare_vote(self, node: NodeId, value_hash: bytes) -> bool:
        """Count `node`'s PREPARE; True once the value is prepared (2f matching backups)."""
        key, (pp, digest) = self._voter(node), self._ballot(value_hash)
        if node != self.node and node != pp.sender:  # a primary does not prepare its own
            self._feed(
                sign_message(
                    Prepare(
                        sender=node,
                        epoch=pp.epoch,
                        view=pp.view,
                        seq=pp.seq,
                        digest=digest,
                        pp_signature=pp.signature,
                    ),
                    key,
                )
            )
        slot = self.state.log.get(pp.seq)
        return slot is not None and prepared_digest(self.state, slot, pp.view) == pp.digest

    def record_commit_vote(self, node: NodeId, value_hash: bytes) -> bool:
        """Count `node`'s COMMIT; True once 2f+1 matching commits decided the value."""
        key, (pp, digest) = self._voter(node), self._ballot(value_hash)
        if node != self.node:  # our own commit is sent by the replica once prepared
            self._feed(
                sign_message(
                    Commit(sender=node, epoch=pp.epoch, view=pp.view, seq=pp.seq, digest=digest),
                    key,
                )
            )
        return self.is_committed()

    def is_committed(self) -> bool:
        pp = self._pre_prepare
        return pp is not None and self.state.last_executed >= pp.seq

    def committed_result(self) -> AgreementValue | None:
        """The decided value, once executed; None before."""
        pp = self._pre_prepare
        if pp is None or not self.is_committed():
            return None
        decided = self.state.executed[pp.seq - 1].request
        return None if decided is None else AgreementValue.from_bytes(decided.operation)

    @property
    def evidence(self) -> list[Evidence]:
        return list(self.state.evidence)
