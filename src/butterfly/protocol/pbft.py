"""PBFT as a pure reducer: `step(state, message, now) -> (state, outbound)`.

No sockets, clocks or threads: the driver delivers authenticated-or-not messages and
`Tick`s at `next_deadline(state)`, and sends what comes back. Every input passes one
exhaustive `match`; anything unsigned, wrongly signed, from another epoch or from a
stranger is dropped before it touches the state, and so is a request its client may not
make (`PbftConfig.authorize`), wherever it travels (alone, in a pre-prepare, a prepared
certificate or a new view).

Retransmission is pull-based: while work is outstanding each replica broadcasts a signed
`Status`, and whoever sees it behind relays the signed messages it lacks (pre-prepares,
votes, the new-view, a certified state transfer, or past a pruned log the executed
state: `pbft_snapshot`). Relaying is safe because every message
carries its author's signature; the same status also lets replicas compare log digests,
which is how forks are reported when more than f replicas lie. A client's request is
the exception, pushed rather than pulled: a backup relays it to the primary, once per
primary (`pbft_order.relay`), so a client cut off from the primary alone is ordered at
once.

Modules: `pbft_state` (config, state), `pbft_order` (normal case, checkpoints),
`pbft_viewchange` (view change, new view, state transfer), `pbft_veto` (a slot the
backups refuse ends the view at once), `pbft_snapshot` (executed state for a replica
behind a pruned log), `evidence` (equivocation).
"""

from __future__ import annotations

from typing import assert_never

from butterfly.protocol import evidence
from butterfly.protocol.inputs import SuspectPrimary, Tick
from butterfly.protocol.pbft_members import taking_part
from butterfly.protocol.pbft_order import (
    admissible,
    note_divergence,
    on_checkpoint,
    on_commit,
    on_pre_prepare,
    on_prepare,
    on_request,
    prune,
    vetoed,
)
from butterfly.protocol.pbft_snapshot import offer, on_snapshot
from butterfly.protocol.pbft_state import (
    PbftConfig,
    ReplicaState,
    Send,
    Signed,
    busy,
    clone,
    digest_at,
    entry_at,
    new_replica,
    next_deadline,
    sign,
    status_of,
)
from butterfly.protocol.pbft_veto import decline, drop_refused, on_veto, review
from butterfly.protocol.pbft_viewchange import (
    on_new_view,
    on_state_transfer,
    on_view_change,
    start_view_change,
    state_transfer,
)
from butterfly.protocol.sign import verify_message
from butterfly.types.wire.agreement import (
    CheckpointVote,
    Commit,
    Evidence,
    NewView,
    Prepare,
    PrePrepare,
    Request,
    StateSnapshot,
    StateTransfer,
    Status,
    Veto,
    ViewChange,
)

Input = (
    Tick
    | SuspectPrimary
    | Request
    | PrePrepare
    | Prepare
    | Veto
    | Commit
    | CheckpointVote
    | ViewChange
    | NewView
    | Status
    | StateTransfer
    | StateSnapshot
    | Evidence
)
"""What a replica consumes: PBFT's messages plus the passage of time."""

__all__ = [
    "Input",
    "PbftConfig",
    "ReplicaState",
    "Send",
    "Signed",
    "SuspectPrimary",
    "Tick",
    "authentic",
    "clone",
    "digest_at",
    "entry_at",
    "new_replica",
    "next_deadline",
    "prune",
    "step",
]


OWN_RELAYED = (PrePrepare, Commit, CheckpointVote, NewView)
"""What a peer may hand back to us that we signed ourselves: the parts of a commit
certificate, a stable checkpoint's proof or a view's installation, relayed to a replica
that restarted with an empty log (`_relay_decided`). Without them a restarted primary
never executes the slots it pre-prepared before the crash: only it signed those
pre-prepares, so no certificate for them reaches it otherwise, and it lags for good
while its peers relay to it ever faster."""


def authentic(state: ReplicaState, message: Input) -> bool:
    """Signed by a replica of this epoch other than us, or by us when relayed back to us
    (`OWN_RELAYED`: it can only be what we signed before a restart); for requests, by a
    client, within what that client may ask for (`PbftConfig.authorize`)."""
    if isinstance(message, Tick | SuspectPrimary) or message.epoch != state.config.epoch:
        return False
    if isinstance(message, Request):  # a request this replica vetoes is not taken up
        return admissible(state, message) and vetoed(state, message) is None
    keys = state.config.keys
    if not state.config.is_member(message.sender):
        return False
    if message.sender == state.me and not isinstance(message, OWN_RELAYED):
        return False
    return verify_message(message, keys[message.sender])


def step(state: ReplicaState, message: Input, now: float) -> tuple[ReplicaState, list[Send]]:
    """Consume one input at time `now`; returns the state and the messages to send."""
    out: list[Send] = []
    if not taking_part(state):  # removed from the replica set (`pbft_members`)
        return state, out
    retired = state.retired
    if isinstance(message, Status) and retired is not None and authentic(retired, message):
        if message.last_executed < retired.last_executed:  # behind the membership change
            _relay_decided(retired, message, out)
        return state, out
    if not isinstance(message, Tick | SuspectPrimary) and not authentic(state, message):
        return state, out
    match message:
        case Tick():
            _on_tick(state, now, out)
        case SuspectPrimary():
            if message.view == state.view and state.active and not state.is_primary:
                start_view_change(state, state.view + 1, now, out)
        case Request():
            on_request(state, message, now, out)
        case PrePrepare():
            if on_pre_prepare(state, message, now, out):
                decline(state, message, now)
        case Prepare():
            on_prepare(state, message, now, out)
        case Veto():
            on_veto(state, message, now, out)
        case Commit():
            on_commit(state, message, now, out)
        case CheckpointVote():
            on_checkpoint(state, message, now, out)
        case ViewChange():
            on_view_change(state, message, now, out)
        case NewView():
            on_new_view(state, message, now, out)
        case Status():
            _on_status(state, message, now, out)
        case StateTransfer():
            on_state_transfer(state, message, now, out)
        case StateSnapshot():
            on_snapshot(state, message, now, out)
        case Evidence():
            evidence.accept_evidence(state, message)
        case _:
            assert_never(message)
    if busy(state) and (
        state.status_deadline is None
        or state.status_deadline > now + state.config.retransmit_interval
    ):
        state.status_deadline = now + state.config.retransmit_interval
    return state, out


def _on_tick(state: ReplicaState, now: float, out: list[Send]) -> None:
    drop_refused(state, now)
    review(state, now, out)
    if state.in_view_change:
        if state.vc_deadline is not None and now >= state.vc_deadline:
            start_view_change(state, state.view + 1, now, out)  # the new primary failed too
    elif state.timer_deadline is not None and now >= state.timer_deadline:
        start_view_change(state, state.view + 1, now, out)  # the primary is not ordering
    if state.status_deadline is not None and now >= state.status_deadline:
        interval = state.config.retransmit_interval
        if now - state.progress_at >= interval:  # while executing, nothing needs resending
            out.append(Send(None, sign(state, status_of(state))))
        state.status_deadline = now + (
            interval if busy(state) else state.config.idle_status_interval
        )


def _on_status(state: ReplicaState, status: Status, now: float, out: list[Send]) -> None:
    """Send a peer what its status says it lacks; ask for what we lack.

    Answering a status with our own is rate-limited per peer: two replicas that cannot
    help each other would otherwise bounce statuses at network speed.
    """
    peer = status.sender
    seen = status.last_executed
    ours = digest_at(state, seen) if 0 < seen <= state.last_executed else None
    if ours is not None and ours != status.executed_digest:
        note_divergence(state, peer, seen, status.executed_digest)
    if seen < state.last_executed:
        _relay_decided(state, status, out)
    asked = seen > state.last_executed or status.view > state.view
    if asked or (status.view == state.view and not status.in_view_change and not state.active):
        last = state.status_answered.get(peer)
        if last is None or now - last >= state.config.retransmit_interval:
            state.status_answered[peer] = now
            out.append(Send(peer, sign(state, status_of(state))))  # it can bring us forward
        return
    if status.view < state.view or status.in_view_change:
        if state.in_view_change:
            mine = state.view_changes.get(state.view, {}).get(state.me)
            if mine is not None:
                out.append(Send(peer, mine))
            if status.view < state.view and not status.in_view_change:
                _resend_vetoes(state, status, out)
        elif state.new_view is not None:
            out.append(Send(peer, state.new_view))
        return
    if state.in_view_change:
        return
    for seq in sorted(s for s in state.log if s > state.last_executed):
        slot = state.log[seq]
        if state.view in slot.pre_prepares:
            out.append(Send(peer, slot.pre_prepares[state.view]))
        out.extend(Send(peer, p) for p in slot.prepares.get(state.view, {}).values())
        out.extend(Send(peer, v) for v in slot.vetoes.get(state.view, {}).values())
        out.extend(Send(peer, c) for c in slot.commits.get(state.view, {}).values())


def _resend_vetoes(state: ReplicaState, status: Status, out: list[Send]) -> None:
    """Hand a peer still in the view we left over its vetoes (`pbft_veto`) the vetoes we
    hold of that view's unexecuted slots, ours among them.

    A replica that saw `veto_quorum` vetoes leaves the view at once; should its own veto
    have been lost on the way (a shed frame, a reconnect), the others hold too few and
    stay, and nobody else holds it: the status answers of the view's active replicas
    never resend it, and the others waited out the request timer after all (10 s).
    Vetoes are signed, so any holder may relay them; the peer counts only those of its
    own view (`pbft_veto.on_veto`)."""
    peer = status.sender
    for seq in sorted(s for s in state.log if s > status.last_executed):
        votes = state.log[seq].vetoes.get(status.view, {})
        out.extend(Send(peer, v) for v in votes.values())


def _relay_decided(state: ReplicaState, status: Status, out: list[Send]) -> None:
    """Bring a lagging peer up to our execution, whatever view either of us is in.

    Below our stable checkpoint it gets a certified state transfer, above it the commit
    certificate (pre-prepare and 2f+1 commits) of each slot we executed.
    """
    peer = status.sender
    if status.last_executed < state.base:
        # pruned past it (a replica restarted after more than `history` entries): no log
        # we hold lets it execute, so it gets our executed state instead (f+1 alike make
        # it install it: `pbft_snapshot`), never the log, which would only flood it
        snapshot = offer(state)
        if snapshot is not None:
            out.append(Send(peer, snapshot))
        return
    if status.last_executed < state.low:
        out.append(Send(peer, state_transfer(state, status.last_executed)))
    if status.stable_seq < state.low:
        out.extend(Send(peer, vote) for vote in state.stable_proof)
    for votes in state.checkpoint_votes.values():
        out.extend(Send(peer, vote) for vote in votes.values())
    for seq in range(max(status.last_executed, state.low) + 1, state.last_executed + 1):
        slot = state.log.get(seq)
        pp = slot.decided if slot is not None else None
        if slot is None or pp is None:
            continue
        out.append(Send(peer, pp))
        commits = slot.commits.get(pp.view, {}).values()
        out.extend(Send(peer, c) for c in commits if c.digest == pp.digest)
