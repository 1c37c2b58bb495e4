"""State snapshots: how a replica behind its peers' pruned log catches up.

Peers keep `PbftConfig.history` executed entries below their stable checkpoint; a
replica that restarts (or was cut off) after more than that was agreed can no longer
replay the log from anyone. What it needs is not the log but what the log decided: the
driver's executed state (plans, evictions, the acting gateway, the config position).

Each replica's driver records that state at every checkpoint sequence number it reaches
(`record`), as opaque bytes. When a peer's `Status` shows it behind our pruned log, we
send it our state at our stable checkpoint (`offer`): a signed `StateSnapshot` carrying
the checkpoint's log digest and its proof (2f+1 checkpoint votes). The laggard keeps the
latest offer of each peer (`on_snapshot`) and installs a state only once f+1 distinct
replicas offered the same bytes at the same sequence number and digest, so at least one
honest replica vouches for it, and the proof certifies the digest, so the log it then
continues from is the cluster's. Installing moves its log to that checkpoint (nothing
below it is held) and leaves the state in `ReplicaState.installed` for its driver to
restore; the normal case and the certified relays take it from there.
"""

from __future__ import annotations

import dataclasses

from butterfly.protocol.pbft_order import execute_ready
from butterfly.protocol.pbft_state import ReplicaState, Send, sign, status_of
from butterfly.protocol.pbft_viewchange import valid_stable_proof
from butterfly.types.hashing import sha256
from butterfly.types.wire.agreement import StateSnapshot


def record(state: ReplicaState, seq: int, executed: bytes) -> None:
    """The driver's executed state after every command up to the checkpoint `seq`. Kept
    from the stable checkpoint up (at most a window's worth of checkpoints)."""
    start = state.config.start  # a membership change's: what a joining replica takes
    if seq <= 0 or (seq % state.config.checkpoint_interval and seq != start):
        return
    state.snapshots[seq] = executed
    for old in [s for s in state.snapshots if s < state.low and s != start]:
        del state.snapshots[old]


def offer(state: ReplicaState) -> StateSnapshot | None:
    """Our state at our stable checkpoint, signed, if our driver recorded it."""
    # at the epoch's start (a membership change) there is no proof of the digest: the
    # joining replica takes it on f+1 replicas' word alone, as it takes the state
    # (offered while nothing after it was pruned: the joining replica continues from it)
    start = state.config.start
    low = state.low if state.low in state.snapshots or state.base > start else start
    executed = state.snapshots.get(low)
    if low == 0 or executed is None:
        return None
    at_start = low == state.config.start
    return sign(
        state,
        StateSnapshot(
            sender=state.me,
            epoch=state.config.epoch,
            seq=low,
            digest=state.config.genesis if at_start else state.stable_digest,
            proof=() if at_start else state.stable_proof,
            state=executed,
        ),
    )


def _vouched(snapshot: StateSnapshot) -> tuple[int, bytes, bytes]:
    return snapshot.seq, snapshot.digest, sha256(snapshot.state)


def on_snapshot(state: ReplicaState, snapshot: StateSnapshot, now: float, out: list[Send]) -> None:
    """A peer's offer (its signature checked by `pbft.authentic`): installed once f+1
    distinct replicas offered the same state at the same checkpoint and digest."""
    if snapshot.seq <= state.last_executed:
        return
    if snapshot.proof and not valid_stable_proof(
        state, snapshot.seq, snapshot.digest, snapshot.proof
    ):
        return  # the digest is not the cluster's at that checkpoint
    # no proof: an epoch's start (`pbft_members`), vouched for by f+1 below alone
    older = state.snapshot_offers.get(snapshot.sender)
    if older is None or older.seq <= snapshot.seq:
        state.snapshot_offers[snapshot.sender] = snapshot  # one per peer: bounded
    key = _vouched(snapshot)
    vouching = {s.sender for s in state.snapshot_offers.values() if _vouched(s) == key}
    if len(vouching) >= state.config.f + 1:
        install(state, snapshot, now, out)


def install(state: ReplicaState, snapshot: StateSnapshot, now: float, out: list[Send]) -> None:
    """Continue from the snapshot's checkpoint: what we held below it is dropped (it was
    executed there, by the state we now take), the checkpoint becomes our stable one."""
    seq = snapshot.seq
    if not snapshot.proof:  # the epoch's start: where its view changes quote from
        state.config = dataclasses.replace(state.config, start=seq, start_digest=snapshot.digest)
    state.held = 0
    state.last_executed = state.base = seq
    state.executed, state.digests = [], [snapshot.digest]
    state.low, state.stable_digest, state.stable_proof = seq, snapshot.digest, snapshot.proof
    state.log = {s: slot for s, slot in state.log.items() if s > seq}
    state.checkpoint_votes = {s: v for s, v in state.checkpoint_votes.items() if s > seq}
    state.orphans = {k: v for k, v in state.orphans.items() if k[1] > seq}
    state.next_seq = max(state.next_seq, seq + 1)
    state.snapshots = {seq: snapshot.state}  # we can vouch for it in turn
    state.snapshot_offers = {}
    state.installed = (seq, snapshot.state)
    state.progress_at = now
    out.append(Send(None, sign(state, status_of(state))))  # peers relay what follows
    execute_ready(state, now, out)


__all__ = ["install", "offer", "on_snapshot", "record"]
