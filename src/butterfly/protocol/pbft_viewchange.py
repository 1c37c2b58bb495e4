"""PBFT view change, new view and state transfer (Castro and Liskov, sections 4.4-4.5).

A view change carries each replica's stable checkpoint (with its 2f+1 votes) and a
prepared certificate for every slot above it, so anything that committed at an honest
replica is prepared at f+1 honest ones and reappears, with its digest, in the next view.
The new primary's choice of pre-prepares is a pure function of the 2f+1 view changes it
quotes, and every replica recomputes it instead of trusting the primary.
"""

from __future__ import annotations

from dataclasses import dataclass

from butterfly.protocol import evidence
from butterfly.protocol.pbft_order import (
    accept_pre_prepare,
    apply_entry,
    assign_pending,
    certified_body,
    execute_ready,
    rearm_timer,
    set_stable,
)
from butterfly.protocol.pbft_state import (
    ReplicaState,
    Send,
    may_sign,
    note_signed,
    prepared_digest,
    request_key,
    sign,
)
from butterfly.protocol.sign import verify_message
from butterfly.types.hashing import NULL_DIGEST, chain
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import (
    CheckpointVote,
    NewView,
    PreparedCertificate,
    PrePrepare,
    Request,
    StateTransfer,
    ViewChange,
    request_digest,
)


@dataclass(frozen=True, slots=True)
class NewViewPlan:
    """What 2f+1 view changes imply: the checkpoint to start from and the slots to redo."""

    stable_seq: int
    stable_digest: bytes
    stable_proof: tuple[CheckpointVote, ...]
    entries: tuple[tuple[int, bytes, Request | None], ...]  # (seq, digest, request)

    @property
    def max_seq(self) -> int:
        return self.entries[-1][0] if self.entries else self.stable_seq


def prepared_certificates(state: ReplicaState) -> tuple[PreparedCertificate, ...]:
    """For each slot above the checkpoint, the prepared value of the highest view."""
    certs = []
    for seq in sorted(s for s in state.log if s > state.low):
        slot = state.log[seq]
        for view in sorted(slot.pre_prepares, reverse=True):
            digest = prepared_digest(state, slot, view)
            if digest is None:
                continue
            lead = state.config.primary_of(view)
            prepares = slot.prepares.get(view, {})  # none: a quorum of one (n = 1)
            votes = sorted(
                (p for j, p in prepares.items() if j != lead and p.digest == digest),
                key=lambda p: p.sender,
            )
            proof = tuple(votes[: state.config.quorum - 1])
            certs.append(PreparedCertificate(slot.pre_prepares[view], proof))
            break
    return tuple(certs)


def start_view_change(state: ReplicaState, view: int, now: float, out: list[Send]) -> None:
    """Stop the normal case and vote for `view`; the wait doubles per failed view."""
    cfg = state.config
    state.view, state.in_view_change, state.new_view = view, True, None
    state.vc_attempt += 1
    state.vc_deadline = None  # runs once 2f+1 replicas want this view (see arm_vc_timer)
    state.timer_key = state.timer_deadline = None
    headers = tuple(
        pp.header()
        for seq in sorted(s for s in state.log if s > state.low)
        for _, pp in sorted(state.log[seq].pre_prepares.items())
    )
    vc = sign(
        state,
        ViewChange(
            sender=state.me,
            epoch=cfg.epoch,
            view=view,
            stable_seq=state.low,
            stable_digest=state.stable_digest,
            stable_proof=state.stable_proof,
            prepared=prepared_certificates(state),
            pre_prepared=headers,
        ),
    )
    state.view_changes = {w: d for w, d in state.view_changes.items() if w >= view}
    state.view_changes.setdefault(view, {})[state.me] = vc
    out.append(Send(None, vc))
    arm_vc_timer(state, now)
    maybe_new_view(state, now, out)


def arm_vc_timer(state: ReplicaState, now: float) -> None:
    """Wait for the new primary only once 2f+1 replicas want the view (PBFT section 4.5.2).

    A replica that timed out alone (it missed messages the others got) must not race ahead
    through views the others never enter; it waits, and catches up by commit certificates.
    """
    cfg = state.config
    votes = state.view_changes.get(state.view, {})
    if state.in_view_change and state.vc_deadline is None and len(votes) >= cfg.quorum:
        backoff = min(2 ** (state.vc_attempt - 1), cfg.max_backoff)
        state.vc_deadline = now + cfg.view_change_timeout * backoff


def valid_stable_proof(
    state: ReplicaState, seq: int, digest: bytes, proof: tuple[CheckpointVote, ...]
) -> bool:
    """2f+1 distinct replicas signed that the log digest at `seq` is `digest`."""
    cfg = state.config
    if seq == cfg.start:
        return digest == cfg.genesis and not proof
    if seq % cfg.checkpoint_interval:
        return False
    signers: set[NodeId] = set()
    for vote in proof:
        if (
            vote.seq != seq
            or vote.digest != digest
            or vote.epoch != cfg.epoch
            or not cfg.is_member(vote.sender)
            or vote.sender in signers
            or not verify_message(vote, cfg.keys[vote.sender])
        ):
            return False
        signers.add(vote.sender)
    return len(signers) >= cfg.quorum


def valid_certificate(state: ReplicaState, cert: PreparedCertificate) -> bool:
    cfg, pp = state.config, cert.pre_prepare
    lead = cfg.primary_of(pp.view)
    if pp.sender != lead or pp.epoch != cfg.epoch or not certified_body(state, pp):
        return False
    if not verify_message(pp, cfg.keys[lead]):
        return False
    voters: set[NodeId] = set()
    for p in cert.prepares:
        if (
            (p.view, p.seq, p.digest, p.epoch) != (pp.view, pp.seq, pp.digest, cfg.epoch)
            or not cfg.is_member(p.sender)
            or p.sender == lead
            or p.sender in voters
            or not verify_message(p, cfg.keys[p.sender])
        ):
            return False
        voters.add(p.sender)
    return len(voters) >= cfg.quorum - 1


def valid_view_change(state: ReplicaState, vc: ViewChange, view: int) -> bool:
    cfg = state.config
    if vc.view != view or vc.epoch != cfg.epoch or not cfg.is_member(vc.sender):
        return False
    if not verify_message(vc, cfg.keys[vc.sender]):
        return False
    if not valid_stable_proof(state, vc.stable_seq, vc.stable_digest, vc.stable_proof):
        return False
    seqs: set[int] = set()
    for cert in vc.prepared:
        pp = cert.pre_prepare
        if pp.seq in seqs or pp.view >= view:
            return False
        if not vc.stable_seq < pp.seq <= vc.stable_seq + cfg.window:
            return False
        if not valid_certificate(state, cert):
            return False
        seqs.add(pp.seq)
    return True


def plan_new_view(view_changes: tuple[ViewChange, ...]) -> NewViewPlan:
    """The pre-prepares a new view must carry, as a function of its view changes only."""
    base = max(view_changes, key=lambda vc: (vc.stable_seq, -vc.sender))
    low = base.stable_seq
    chosen: dict[int, PrePrepare] = {}
    for vc in view_changes:
        for cert in vc.prepared:
            pp = cert.pre_prepare
            best = chosen.get(pp.seq)
            if pp.seq > low and (best is None or (pp.view, pp.digest) > (best.view, best.digest)):
                chosen[pp.seq] = pp
    top = max(chosen, default=low)
    entries = tuple(
        (seq, chosen[seq].digest, chosen[seq].request)
        if seq in chosen
        else (seq, NULL_DIGEST, None)
        for seq in range(low + 1, top + 1)
    )
    return NewViewPlan(low, base.stable_digest, base.stable_proof, entries)


def on_view_change(state: ReplicaState, vc: ViewChange, now: float, out: list[Send]) -> None:
    check_quoted_headers(state, vc, out)
    if vc.view < state.view or (vc.view == state.view and state.active):
        return
    if vc.sender in state.view_changes.get(vc.view, {}):
        return
    if not valid_view_change(state, vc, vc.view):
        return
    state.view_changes.setdefault(vc.view, {})[vc.sender] = vc
    higher = {j for w, votes in state.view_changes.items() if w > state.view for j in votes}
    if len(higher) >= state.config.f + 1:  # f+1 want a later view: at least one is honest
        target = min(w for w, votes in state.view_changes.items() if w > state.view and votes)
        start_view_change(state, target, now, out)
    arm_vc_timer(state, now)
    maybe_new_view(state, now, out)


def check_quoted_headers(state: ReplicaState, vc: ViewChange, out: list[Send]) -> None:
    """Pre-prepare headers inside a view change may prove the old primary equivocated."""
    for header in vc.pre_prepared:
        evidence.check_header(state, header, out)
    for cert in vc.prepared:
        evidence.check_header(state, cert.pre_prepare.header(), out)


def maybe_new_view(state: ReplicaState, now: float, out: list[Send]) -> None:
    """As the next primary with 2f+1 view changes, announce and enter the new view."""
    votes = state.view_changes.get(state.view, {})
    if state.active or state.primary != state.me or len(votes) < state.config.quorum:
        return
    chosen = tuple(votes[j] for j in sorted(votes))[: state.config.quorum]
    plan = plan_new_view(chosen)
    if not all(may_sign(state, state.view, seq) for seq, _, _ in plan.entries):
        # a previous life of ours may have announced this view with other pre-prepares
        # (`pbft_state.Signed`): the view times out and the next primary announces its own
        return
    for seq, _, _ in plan.entries:
        note_signed(state, state.view, seq)
    pre_prepares = tuple(
        sign(
            state,
            PrePrepare(
                sender=state.me,
                epoch=state.config.epoch,
                view=state.view,
                seq=seq,
                digest=digest,
                request=request,
            ),
        )
        for seq, digest, request in plan.entries
    )
    nv = sign(
        state,
        NewView(
            sender=state.me,
            epoch=state.config.epoch,
            view=state.view,
            view_changes=chosen,
            pre_prepares=pre_prepares,
        ),
    )
    out.append(Send(None, nv))
    install(state, nv, plan, now, out)


def on_new_view(state: ReplicaState, nv: NewView, now: float, out: list[Send]) -> None:
    cfg, view = state.config, nv.view
    if view < state.view or (view == state.view and state.active):
        return
    if nv.sender != cfg.primary_of(view):
        return
    senders = {vc.sender for vc in nv.view_changes}
    if len(senders) != len(nv.view_changes) or len(senders) < cfg.quorum:
        return
    if not all(valid_view_change(state, vc, view) for vc in nv.view_changes):
        return
    plan = plan_new_view(nv.view_changes)
    if len(nv.pre_prepares) != len(plan.entries):
        return
    for pp, (seq, digest, _) in zip(nv.pre_prepares, plan.entries, strict=True):
        if (pp.sender, pp.epoch, pp.view, pp.seq, pp.digest) != (
            nv.sender,
            cfg.epoch,
            view,
            seq,
            digest,
        ):
            return
        if not certified_body(state, pp) or not verify_message(pp, cfg.keys[nv.sender]):
            return
    for vc in nv.view_changes:
        check_quoted_headers(state, vc, out)
    install(state, nv, plan, now, out)


def install(
    state: ReplicaState, nv: NewView, plan: NewViewPlan, now: float, out: list[Send]
) -> None:
    """Enter the new view: adopt its checkpoint, re-vote its pre-prepares, resume."""
    state.view, state.in_view_change, state.new_view = nv.view, False, nv
    state.vc_attempt, state.vc_deadline = 0, None
    state.view_changes = {w: d for w, d in state.view_changes.items() if w > nv.view}
    set_stable(state, plan.stable_seq, plan.stable_digest, plan.stable_proof, now, out)
    state.assigned = set()
    for pp in nv.pre_prepares:
        if pp.seq <= state.low:
            continue
        if pp.request is not None:
            state.assigned.add(request_key(pp.request))
        accept_pre_prepare(state, pp, now, out)
    state.next_seq = max(plan.max_seq, state.low) + 1
    rearm_timer(state, now, restart=True)
    assign_pending(state, now, out)
    execute_ready(state, now, out)


# --- state transfer ---------------------------------------------------------------------


def state_transfer(state: ReplicaState, after: int) -> StateTransfer:
    """Our log from `after` + 1 up to our stable checkpoint, with the checkpoint's proof
    (`after` at or above `base`: what is below was pruned)."""
    return sign(
        state,
        StateTransfer(
            sender=state.me,
            epoch=state.config.epoch,
            seq=state.low,
            digest=state.stable_digest,
            proof=state.stable_proof,
            entries=tuple(state.executed[after - state.base : state.low - state.base]),
        ),
    )


def on_state_transfer(
    state: ReplicaState, transfer: StateTransfer, now: float, out: list[Send]
) -> None:
    """Install a prefix whose end digest 2f+1 replicas signed; the sender is not trusted."""
    if transfer.seq <= state.last_executed:
        return
    if len(transfer.entries) != transfer.seq - state.last_executed:
        return
    if not valid_stable_proof(state, transfer.seq, transfer.digest, transfer.proof):
        return
    digest = state.digests[-1]
    for offset, pp in enumerate(transfer.entries, start=state.last_executed + 1):
        if pp.seq != offset or request_digest(pp.request) != pp.digest:
            return
        digest = chain(digest, offset, pp.digest)
    if digest != transfer.digest:
        return
    for pp in transfer.entries:
        evidence.check_header(state, pp.header(), out)
        apply_entry(state, pp, now, out, reply=False)
        if state.held:  # a membership change: the rest waits for its owner, then is asked again
            return
    state.orphans = {k: v for k, v in state.orphans.items() if k[1] > transfer.seq}
    set_stable(state, transfer.seq, transfer.digest, transfer.proof, now, out)
    execute_ready(state, now, out)
