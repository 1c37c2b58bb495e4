"""The signed record a stage node returns for every step it computes, and its check.

A record binds the signer to exactly the bytes it sent and received: `output_hash` is the
digest of the entry's slice of the tensor it sends (dtype, shape and every raw byte, not
a fingerprint), `input_hash` that of the slice it received, and the Merkle root and the
fingerprint (protocol/proof.py) let an auditor on another machine compare the work itself.

Whoever receives a step checks it before using it (`check_records`): every earlier stage
of the chain signed a record for every entry, the records chain (each one's input is the
one before's output) and the last one's output is the bytes received. A receiver refuses
what fails and says so (`RecordMismatch`); it never computes on bytes nobody signed. The
gateway, which trusts itself, settles who lied (dataplane.engine): see
SECURITY.md, "Records bound to the bytes sent".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from butterfly.protocol.proof import describes, fingerprint, generate_proof, tensor_bytes
from butterfly.protocol.sign import SigningKey, verify_message
from butterfly.types.errors import ButterflyError, InvalidMessage
from butterfly.types.hashing import sha256_parts
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.wire.agreement import Fingerprint, Proof, decode, encode

RECORD_MISMATCH = "record_mismatch"
"""The `error_type` of a step refused for its records (`RecordMismatch.kind`)."""


class RecordMismatch(InvalidMessage):
    """A step's input does not match the signed records that came with it (one missing,
    forged, not chained, or the bytes are not what the last one signed). Retriable: the
    gateway re-runs the step with itself between the two nodes to learn which one lied."""

    retriable = True


def _prefix(t: torch.Tensor) -> bytes:
    return f"{t.dtype}:{tuple(t.shape)}:".encode()


def framed(t: torch.Tensor) -> bytes:
    """What a record's hash covers: dtype, shape and the raw bytes of the tensor, so a
    receiver that decodes the same bytes under another dtype or shape sees a mismatch."""
    return _prefix(t) + tensor_bytes(t)


def digest(t: torch.Tensor) -> bytes:
    """The hash a record carries for a tensor (an entry's slice, as sent or received):
    `sha256(framed(t))`, hashed in place (a logits row is 128 KB per token)."""
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return sha256_parts(_prefix(t), flat.numpy().data)


def decode_proofs(raw: Sequence[bytes]) -> Iterator[Proof]:
    """Each signed record of a batch, decoded once; what does not decode proves nothing
    and is dropped (the stage it claims for then counts as having sent none)."""
    for data in raw:
        try:
            proof = decode(data)
        except ButterflyError:
            continue
        if isinstance(proof, Proof):
            yield proof


Signers = Callable[[int], Iterable[NodeId]]
"""Who may sign the record of a chain position: the holders of its layer range."""


@dataclass(frozen=True)
class Shape:
    """A fingerprint's strength: `top_k` values per `chunk` positions. The audit takes
    the weaker of the shapes the cluster agreed last and just before (`after`): nodes
    move from one to the other each at its own moment of the agreed change."""

    top_k: int
    chunk: int

    def admits(self, fp: Fingerprint) -> bool:
        return fp.k >= self.top_k and fp.chunk <= self.chunk

    def after(self, new: Shape) -> Shape:
        """What the audit takes while nodes move to `new`, this one agreed before it."""
        return Shape(min(self.top_k, new.top_k), max(self.chunk, new.chunk))


SHAPE_GRACE_S = 60.0
"""How long after an agreed change of the fingerprint's shape records of the shape before
still pass the audit: each node takes the change at its own moment, within seconds."""


@dataclass
class Shapes:
    """The fingerprint shape the cluster agreed last, the one before, and when it moved:
    which shape the audit of a request takes (`accepted`)."""

    agreed: Shape
    weakest: Shape  # of the agreed shape and the one before
    changed: float = -SHAPE_GRACE_S  # monotonic time of the last agreed change

    def change(self, new: Shape, now: float) -> None:
        self.agreed, self.weakest, self.changed = new, self.agreed.after(new), now

    def accepted(self, began: float) -> Shape:
        """The weakest fingerprint the audit of a request begun at `began` takes: the
        weaker of the agreed shape and the one before for a request begun before the
        change's grace ended (`SHAPE_GRACE_S`: nodes move to it each at its own moment,
        and a request's early records may be of the shape before), the agreed one for
        later requests (a shape agreed once and left was taken for ever: a review)."""
        return self.weakest if began < self.changed + SHAPE_GRACE_S else self.agreed


def route_signers(route: Sequence[NodeId], first: int, holders: Signers) -> Signers:
    """Who may sign each stage's record of a step sent down `route` (its node for stage
    `first` first): the route's own node for the stages it covers, any holder of the range
    for the others. Taking any holder's record there let a holder that was not on the
    route put its own record of a stage ahead of the real one, which the checks then
    took, and blamed the honest node that delivered the step."""

    def signers(j: int) -> Iterable[NodeId]:
        return (route[j - first],) if 0 <= j - first < len(route) else holders(j)

    return signers


def check_records(
    proofs: Iterable[Proof],
    *,
    keys: Mapping[NodeId, bytes],
    request_id: RequestId,
    step: int,
    upto: int,
    received: torch.Tensor,
    signers: Signers,
    epoch: int,
    described: bool = False,
) -> list[Proof]:
    """The records of stages [0, upto) of one entry, in order, if they vouch for
    `received`; else `RecordMismatch` naming what is wrong.

    Each must be signed by a holder of its stage's range (`signers`) in `epoch`, each
    one's `input_hash` must be the previous one's `output_hash`, and the last one's
    `output_hash` must be the digest of `received`, the entry's bytes as they arrived.
    With `described`, the last one's fingerprint must describe `received` exactly
    (`proof.describes`): an audit checks the fingerprints, not the hashes, so a liar that
    signed an honest computation's fingerprint beside its lying bytes passed it. Its
    shape is the audit's to judge (`audit.Auditor.audit`): a receiver may not have taken
    an agreed change of it yet, and must not refuse, or blame, an honest sender for that.
    """
    found: dict[int, Proof] = {}
    for p in proofs:
        if p.request_id != request_id or p.step != step or not 0 <= p.stage < upto:
            continue
        if p.stage in found or p.epoch != epoch or p.sender not in set(signers(p.stage)):
            continue
        key = keys.get(p.sender)
        if key is not None and verify_message(p, key):
            found[int(p.stage)] = p
    chain: list[Proof] = []
    for index in range(upto):
        record = found.get(index)
        if record is None:
            raise RecordMismatch(f"step {step} of {request_id}: no signed record of stage {index}")
        if chain and chain[-1].output_hash != record.input_hash:
            raise RecordMismatch(
                f"step {step} of {request_id}: stage {index} (node {record.sender}) signed another"
                f" input than stage {index - 1} (node {chain[-1].sender}) signed as its output"
            )
        chain.append(record)
    if chain and chain[-1].output_hash != digest(received):
        raise RecordMismatch(
            f"step {step} of {request_id}: the bytes received are not what stage {upto - 1} "
            f"(node {chain[-1].sender}) signed",
            blame=chain[-1].sender,
        )
    if chain and described and not describes(chain[-1].fingerprint, received):
        raise RecordMismatch(
            f"step {step} of {request_id}: stage {upto - 1} (node {chain[-1].sender}) signed a "
            "fingerprint of other bytes than it sent",
            blame=chain[-1].sender,
        )
    return chain


def culprit(
    proofs: Iterable[Proof],
    *,
    keys: Mapping[NodeId, bytes],
    request_id: RequestId,
    step: int,
    upto: int,
    received: torch.Tensor,
    signers: Signers,
    epoch: int,
    peer: NodeId,
    sent: bytes | None,
) -> tuple[NodeId, str] | None:
    """Who lied, and how, when the gateway receives `received` from `peer` (the
    authenticated sender) as the output of stages [0, upto) of one entry; None when the
    records vouch for it.

    The gateway trusts itself: it knows what `peer` sent it and what it sent the first
    stage (`sent`, the digest). An honest node checks its input before computing, signs
    exactly what it sends and forwards every record, so a result whose records fail
    convicts the peer that delivered it; a first record whose input is not what the
    gateway sent convicts its signer.
    """
    try:
        chain = check_records(
            proofs,
            keys=keys,
            request_id=request_id,
            step=step,
            upto=upto,
            received=received,
            signers=signers,
            epoch=epoch,
            described=True,
        )
    except RecordMismatch as e:
        return peer, f"its records do not vouch for the bytes it sent: {e}"
    if not chain or chain[-1].sender != peer:
        return peer, "it sent another node's record as its own"
    if sent is not None and chain[0].input_hash != sent:
        return chain[0].sender, "it signed another input than the gateway sent it"
    return None


@dataclass(frozen=True)
class Prover:
    node: NodeId
    key: SigningKey
    k: int = 8  # fingerprint: largest activations kept per chunk
    chunk: int = 1  # positions per chunk; 1 lets an audit compare any single position
    keys: Mapping[NodeId, bytes] = field(default_factory=dict)  # to check others' records

    def prove(
        self,
        *,
        epoch: Epoch,
        request_id: RequestId,
        step: int,
        stage: StageIndex,
        layers: LayerRange,
        x_in: torch.Tensor,
        out: torch.Tensor,
        layer_outputs: Sequence[torch.Tensor],
    ) -> bytes:
        """Sign one entry: `x_in` exactly as received, `out` exactly as it will be sent."""
        proof = generate_proof(
            key=self.key,
            signer=self.node,
            epoch=epoch,
            request_id=request_id,
            step=step,
            stage=stage,
            layers=(layers.start, layers.end),
            input_data=framed(x_in),
            output_data=framed(out),
            layer_outputs=tuple(tensor_bytes(t) for t in layer_outputs),
            fingerprint=fingerprint(out, self.k, self.chunk),
        )
        return encode(proof)
