"""Changing the replica set at an executed command, identically on every replica.

A membership change rides on an agreed command (a config update of `cluster.members` and
`cluster.public_keys`). The replica cannot tell from the command alone what it leaves
behind (the node's config replica may refuse it), so it only knows which commands *may*
change the set (`PbftConfig.barrier`): after executing one at sequence number `s` it
executes nothing more (`ReplicaState.held`) until its owner, having applied the command,
calls `resume` with the replica keys that now hold. Every honest replica applies the same
command at the same `s` and so resumes with the same keys.

When the keys changed, the replica begins a new epoch after `s`:

- the epoch number grows (`epoch_of`: slots plus tombstones, so a pure function of the
  roster, which a node that restarts or joins with the new roster computes alike), and
  every message of the old epoch is refused from then on (`pbft.authentic`): votes of the
  old set, for sequence numbers after `s` or any other, count for nothing;
- the log restarts empty at `s` (the epoch's start: its low water mark and digest, so a
  view change in the new epoch quotes `s` with no proof); pre-prepares of the old epoch
  above `s` are dropped, their requests (signed for the old epoch) are the proposers' to
  send again (`agreement.driver` does);
- view, primary and quorums follow the live members (`PbftConfig.members`);
- the old epoch's replica is kept, frozen (`ReplicaState.retired`), only to relay the log
  up to `s` to a replica still behind it, which then makes the same change itself.

A replica that joins (or restarts) with the new roster starts in the new epoch knowing
neither `s` nor its digest: its peers offer it their executed state at `s`
(`pbft_snapshot.offer`), which it installs once f+1 replicas offered the same (one of them
is honest, so the digest is the cluster's). A removed replica stops taking part.
"""

from __future__ import annotations

import dataclasses

from butterfly.protocol.pbft_order import execute_ready
from butterfly.protocol.pbft_state import ReplicaState, Send, sign, status_of
from butterfly.types.ids import Epoch, NodeId


def epoch_of(keys: tuple[bytes, ...]) -> Epoch:
    """The agreement epoch of a roster: each added member adds a slot and each removal a
    tombstone, so the number only grows, and every node with the roster computes it."""
    return Epoch(len(keys) + sum(1 for k in keys if not k))


def resume(state: ReplicaState, keys: tuple[bytes, ...], now: float) -> list[Send]:
    """The barrier command at `state.held` was applied by the owner; `keys` is the replica
    set it left. Unchanged: execution goes on. Changed: the next epoch begins after it."""
    out: list[Send] = []
    if not state.held:
        return out
    if keys != state.config.keys:
        _begin_epoch(state, keys, now)
    state.held = 0
    out.append(Send(None, sign(state, status_of(state))))  # peers relay what follows
    execute_ready(state, now, out)
    return out


def taking_part(state: ReplicaState) -> bool:
    """False once this replica was removed from the set."""
    return state.config.is_member(state.me)


def _begin_epoch(state: ReplicaState, keys: tuple[bytes, ...], now: float) -> None:
    seq, digest = state.last_executed, state.digests[-1]
    old = state.config
    # replicas that were clients (a node proposes with its node key) are clients with
    # their new keys; other clients stay
    clients = {c: k for c, k in old.clients.items() if c >= len(keys)}
    if any(c < len(old.keys) for c in old.clients):
        clients.update({NodeId(i): k for i, k in enumerate(keys) if k})
    config = dataclasses.replace(  # raises, changing nothing, for an unsafe set
        old, keys=keys, clients=clients, epoch=epoch_of(keys), start=seq, start_digest=digest
    )
    state.retired = dataclasses.replace(state, retired=None, held=0)  # the old containers
    state.config = config
    # the old epoch's requests are not admissible any more; executed ones are replays
    floor = dict(state.reply_floor)
    for client, ts in state.replies:
        floor[client] = max(floor.get(client, -1), ts)
    state.reply_floor = floor
    state.replies, state.pending, state.assigned, state.relayed = {}, {}, set(), {}
    state.view, state.in_view_change = state.config.initial_view, False
    state.low = state.base = seq
    state.stable_digest, state.stable_proof = digest, ()
    state.next_seq = seq + 1
    state.log, state.checkpoint_votes, state.orphans = {}, {}, {}
    state.executed, state.digests = [], [digest]
    state.view_changes, state.new_view = {}, None
    state.timer_key = state.timer_deadline = state.vc_deadline = None
    state.vc_attempt = 0
    state.status_deadline = now
    state.status_answered = {}
    state.snapshots, state.snapshot_offers = {}, {}
    state.progress_at = now


__all__ = ["epoch_of", "resume", "taking_part"]
