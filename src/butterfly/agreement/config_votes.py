"""PREPARE votes on config proposals: signing them, and checking a commit's certificate.

Seed 002 commits a config change only with 2f+1 PREPARE OKs. The proposer (the gateway)
could lie about having them, so its `ConfigUpdate` carries the signed OKs themselves and
every node checks them when the agreement executes the command: a change without 2f+1
valid OK signatures from distinct members, or whose config sequence number is not one
past the highest the voters reported, is refused by every honest node alike (the check is
a pure function of the ordered command, so they cannot disagree about it).
"""

from __future__ import annotations

from butterfly.protocol.quorum import quorum
from butterfly.protocol.sign import SigningKey, verify_bytes
from butterfly.types.ids import NodeId
from butterfly.types.wire.commands import ConfigUpdate
from butterfly.types.wire.control import ConfigVote

VOTE_CONTEXT = b"butterfly/config-prepare-ok/v1\x00"
MAX_REASON = 2000


def vote_bytes(digest: str, last_seq: int) -> bytes:
    """What an OK vote signs: the proposal digest and the voter's config position."""
    return VOTE_CONTEXT + digest.encode() + b"\x00" + str(last_seq).encode()


def make_vote(
    key: SigningKey, node: NodeId, digest: str, last_seq: int, *, ok: bool, reason: str = ""
) -> ConfigVote:
    """A vote for the wire; only OK votes are signed (a REJECT proves nothing to others)."""
    signature = key.sign(vote_bytes(digest, last_seq)) if ok else b""
    return ConfigVote(node, digest, ok, reason[:MAX_REASON], last_seq, signature)


def valid_vote(vote: ConfigVote, digest: str, keys: tuple[bytes, ...]) -> bool:
    """An OK for `digest`, signed by the member it names."""
    return (
        vote.ok
        and vote.digest == digest
        and 0 <= vote.node < len(keys)
        and verify_bytes(keys[vote.node], vote.signature, vote_bytes(digest, vote.last_seq))
    )


def certificate_problem(update: ConfigUpdate, digest: str, keys: tuple[bytes, ...], f: int) -> str:
    """Why `update`'s votes do not justify committing it, or "" when they do."""
    nodes, seqs, sigs = update.vote_nodes, update.vote_seqs, update.vote_signatures
    if not len(nodes) == len(seqs) == len(sigs):
        return "vote lists of different lengths"
    if len(set(nodes)) != len(nodes):
        return "a voter is listed twice"
    valid = [
        (node, seq)
        for node, seq, sig in zip(nodes, seqs, sigs, strict=True)
        if 0 <= node < len(keys)
        and keys[node]  # b"": a removed member (config.roster) votes no more
        and verify_bytes(keys[node], sig, vote_bytes(digest, seq))
    ]
    need = quorum(sum(1 for k in keys if k), f)
    if len(valid) < need or len(valid) != len(nodes):
        return f"{len(valid)} valid PREPARE OK signatures of {len(nodes)}, {need} needed"
    expected = max(seq for _, seq in valid) + 1
    if update.seq != expected:
        return f"config sequence {update.seq}, the voters' positions make it {expected}"
    return ""


__all__ = ["VOTE_CONTEXT", "certificate_problem", "make_vote", "valid_vote", "vote_bytes"]
