"""PBFT's normal case: order requests, vote, execute, checkpoint and collect garbage.

Castro and Liskov, "Practical Byzantine Fault Tolerance" (OSDI 1999), sections 4.2-4.3.
Every function takes a replica state that `pbft.step` has already authenticated the
message for, updates it, and appends what must be sent to `out`.
"""

from __future__ import annotations

from butterfly.protocol import evidence
from butterfly.protocol.pbft_state import (
    MAX_COMMITS_PER_SENDER,
    Divergence,
    ReplicaState,
    Send,
    Slot,
    digest_at,
    may_sign,
    note_signed,
    prepared_digest,
    request_key,
    sign,
    stale_request,
    status_of,
)
from butterfly.protocol.sign import verify_message
from butterfly.types.hashing import NULL_DIGEST, chain
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import (
    CheckpointVote,
    Commit,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    request_digest,
)


def client_signed(state: ReplicaState, request: Request) -> bool:
    """Only requests a known client signed are ever ordered, whoever relays them."""
    key = state.config.clients.get(request.sender)
    return key is not None and request.epoch == state.config.epoch and verify_message(request, key)


def refusal(state: ReplicaState, request: Request) -> str | None:
    """Why this client may not ask for this (`PbftConfig.authorize`), or None."""
    authorize = state.config.authorize
    return None if authorize is None else authorize(request)


def vetoed(state: ReplicaState, request: Request) -> str | None:
    """Why this replica declines to vote for the request (`PbftConfig.veto`), or None."""
    veto = state.config.veto
    return None if veto is None else veto(request)


def admissible(state: ReplicaState, request: Request) -> bool:
    """Client-signed and within what that client may ask for: only such a request is
    pending, ordered or prepared, so a lying primary cannot get another one prepared by
    the honest replicas."""
    return client_signed(state, request) and refusal(state, request) is None


def valid_body(state: ReplicaState, pp: PrePrepare) -> bool:
    """The request beside a pre-prepare matches its digest and is admissible."""
    if pp.request is None:
        return pp.digest == NULL_DIGEST
    return request_digest(pp.request) == pp.digest and admissible(state, pp.request)


def certified_body(state: ReplicaState, pp: PrePrepare) -> bool:
    """The request beside a pre-prepare that 2f+1 replicas vouch for (a prepared
    certificate in a view change, a new view's re-issue of one) matches its digest and
    its client signed it. Whether that client may ask for it is not judged again: the
    honest replicas among the 2f+1 judged it when they prepared it, by the agreed state
    of that time. Judged by today's, a certificate of a command whose authority has
    since moved (a plan the replaced gateway ordered before a takeover) would make every
    view change that quotes it invalid, and no view could ever be installed again."""
    if pp.request is None:
        return pp.digest == NULL_DIGEST
    return request_digest(pp.request) == pp.digest and client_signed(state, pp.request)


def in_window(state: ReplicaState, seq: int) -> bool:
    return state.low < seq <= state.low + state.config.window


# --- requests and timers ----------------------------------------------------------------


def on_request(state: ReplicaState, request: Request, now: float, out: list[Send]) -> None:
    """A client's request (or a backup's relay of one): answer it if executed, else hold
    it pending, time it, relay it to the primary as a backup and order it as primary."""
    key = request_key(request)
    reply = state.replies.get(key)
    if reply is not None:  # executed already: the client missed our reply
        if not reply.signature:
            reply = state.replies[key] = sign(state, reply)
        out.append(Send(request.sender, reply))
        return
    if stale_request(state, request):  # executed before the last prune: a replay
        return
    add_pending(state, request, now)
    relay(state, request, out)
    assign_pending(state, now, out)


def relay(state: ReplicaState, request: Request, out: list[Send]) -> None:
    """As a backup, hand a pending request to the primary, once per primary (PBFT section
    4.1: a backup that receives a request relays it to the primary).

    A client that cannot reach the primary (a cut link, a lost frame) otherwise waits out
    the backups' request timer and a view change although the primary is alive and every
    backup reaches it. The copy is the client's request itself, its signature intact: the
    primary judges it by `pbft.authentic` as if the client had sent it (the client's key,
    what that client may ask for, its own veto): the relayer's identity and authority
    play no part, so no replica can launder a command through a relay. Once per primary
    (`ReplicaState.relayed`): a primary never relays, and a copy relayed between two
    replicas that disagree on the view comes back to one that already relayed it, so
    relays cannot loop; a client's retransmission is relayed again only to a new primary
    (after a view change). The backup keeps timing the request: a primary that gets the
    relay and still does not order it is replaced as before.
    """
    key = request_key(request)
    primary = state.primary
    if primary == state.me or key not in state.pending or state.relayed.get(key) == primary:
        return
    state.relayed[key] = primary
    out.append(Send(primary, request))


def add_pending(state: ReplicaState, request: Request, now: float) -> None:
    key = request_key(request)
    if key not in state.replies and key not in state.pending and not stale_request(state, request):
        state.pending[key] = request
        rearm_timer(state, now)


def forget(state: ReplicaState, request: Request, now: float) -> None:
    """Stop waiting for a request the cluster refused (`pbft_veto`): no longer pending,
    assigned or relayed, and no longer timed. Kept, a refused request was timed for
    good, and `request_timeout` later this replica started a view change nobody joined,
    leaving the agreement until the others next changed view. Its proposer sends it
    again with a new timestamp if it still wants it (`agreement.driver.propose`)."""
    key = request_key(request)
    state.pending.pop(key, None)
    state.assigned.discard(key)
    state.relayed.pop(key, None)
    rearm_timer(state, now)


def rearm_timer(state: ReplicaState, now: float, *, restart: bool = False) -> None:
    """One timer per replica, for the oldest request it waits on (PBFT section 4.4).

    It keeps running while other requests execute, so a primary that orders everything
    but one request is still replaced.
    """
    if restart or state.timer_key not in state.pending:
        state.timer_key = next(iter(state.pending), None)
        state.timer_deadline = (
            None if state.timer_key is None else now + state.config.request_timeout
        )


def assign_pending(state: ReplicaState, now: float, out: list[Send]) -> None:
    """As primary, give pending requests sequence numbers up to the high water mark.

    A restarted primary starts past every sequence number a previous life of it may have
    voted at (`pbft_state.may_sign`): it is back in that view as the last one it voted
    in (`new_replica`), where the numbers it skips hold its earlier pre-prepares
    (executed, or relayed back to it: `pbft.OWN_RELAYED`), or in a view its peers have
    already left. Reusing one was equivocation in the eyes of every peer that still held
    the old pre-prepare. Should a skipped number hold nothing (it crashed between two
    assignments, or the whole cluster restarted and the log with it), execution waits
    for the backups' request timer, and one view change fills it with a null request.
    """
    if not state.is_primary or not state.active:
        return
    if not may_sign(state, state.view, state.next_seq):
        before = state.signed_before
        if before is None or (before.epoch, before.view) != (state.config.epoch, state.view):
            return  # a later epoch or an older view: nothing here is surely fresh
        state.next_seq = before.seq + 1  # past its numbers in the view it voted in last
    for key, request in list(state.pending.items()):
        if key in state.assigned:
            continue
        if state.next_seq > state.low + state.config.window:
            return
        seq = state.next_seq
        state.next_seq += 1
        state.assigned.add(key)
        note_signed(state, state.view, seq)
        pp = sign(
            state,
            PrePrepare(
                sender=state.me,
                epoch=state.config.epoch,
                view=state.view,
                seq=seq,
                digest=request_digest(request),
                request=request,
            ),
        )
        out.append(Send(None, pp))
        accept_pre_prepare(state, pp, now, out)


# --- three-phase agreement --------------------------------------------------------------


def on_pre_prepare(state: ReplicaState, pp: PrePrepare, now: float, out: list[Send]) -> bool:
    """Vote for the current view's primary; keep other views' for commit certificates.
    True when this replica vetoes the current view's pre-prepare (`pbft_veto.veto`)."""
    evidence.check_header(state, pp, out)
    if pp.sender != state.config.primary_of(pp.view) or not known_view(state, pp.view):
        return False
    if pp.sender == state.me:  # ours from before a restart: never assign that seq again
        state.next_seq = max(state.next_seq, pp.seq + 1)
    if not in_window(state, pp.seq) or not valid_body(state, pp):
        return False
    slot = state.log.setdefault(pp.seq, Slot())
    existing = slot.pre_prepares.get(pp.view)
    if existing is not None and existing.digest != pp.digest:
        slot.others[(pp.view, pp.digest)] = pp  # equivocation (recorded by check_header);
        check_decided(state, pp.seq, pp.view, now, out)  # the others may have decided it
        return False
    # a null request is only proposed inside a new-view; alone it is kept, never voted for;
    # one this replica vetoes is kept too, to execute should 2f+1 others commit it
    current = state.active and pp.view == state.view
    vote = pp.request is not None and vetoed(state, pp.request) is None
    if current and vote:
        voted = state.me in slot.prepares.get(pp.view, {}) or state.is_primary
        if existing is None or not voted:  # kept while changing views, vote now
            accept_pre_prepare(state, pp, now, out)
    elif existing is None:
        slot.pre_prepares[pp.view] = pp
        check_decided(state, pp.seq, pp.view, now, out)
    return current and pp.request is not None and not vote


def known_view(state: ReplicaState, view: int) -> bool:
    """Views a replica keeps messages of: bounded, so a liar cannot fill memory."""
    return view <= state.view + state.config.n


def accept_pre_prepare(state: ReplicaState, pp: PrePrepare, now: float, out: list[Send]) -> None:
    """Log a pre-prepare (ours, a primary's, or one from a new-view) and vote for it,
    unless a previous life of this replica may have voted in that slot (`may_sign`)."""
    slot = state.log.setdefault(pp.seq, Slot())
    slot.pre_prepares[pp.view] = pp
    if pp.request is not None:
        add_pending(state, pp.request, now)
        if pp.sender != state.me and request_key(pp.request) in state.pending:
            state.relayed[request_key(pp.request)] = pp.sender  # it holds it: no relay
    if pp.sender != state.me and may_sign(state, pp.view, pp.seq):
        note_signed(state, pp.view, pp.seq)
        prepare = sign(
            state,
            Prepare(
                sender=state.me,
                epoch=state.config.epoch,
                view=pp.view,
                seq=pp.seq,
                digest=pp.digest,
                pp_signature=pp.signature,
            ),
        )
        slot.prepares.setdefault(pp.view, {})[state.me] = prepare
        out.append(Send(None, prepare))
    for other in list(slot.prepares.get(pp.view, {}).values()):
        evidence.check_prepare(state, other, out)
    advance(state, pp.seq, now, out)


def on_prepare(state: ReplicaState, prepare: Prepare, now: float, out: list[Send]) -> None:
    if prepare.sender == state.config.primary_of(prepare.view) or not in_window(state, prepare.seq):
        return
    evidence.check_prepare(state, prepare, out)
    if not state.active or prepare.view != state.view:
        return
    votes = state.log.setdefault(prepare.seq, Slot()).prepares.setdefault(prepare.view, {})
    earlier = votes.get(prepare.sender)
    if earlier is not None:
        if earlier.digest != prepare.digest:
            evidence.record(state, earlier, prepare, out)
        return
    votes[prepare.sender] = prepare
    advance(state, prepare.seq, now, out)


def on_commit(state: ReplicaState, commit: Commit, now: float, out: list[Send]) -> None:
    """Commits of any recent view count: 2f+1 of them decide a slot even for a replica
    that was elsewhere (changing views, partitioned) while the others agreed.
    """
    if not in_window(state, commit.seq) or not known_view(state, commit.view):
        return
    votes = state.log.setdefault(commit.seq, Slot()).commits.setdefault(commit.view, {})
    if (commit.sender, commit.digest) in votes:
        return
    earlier = [c for (j, _), c in votes.items() if j == commit.sender]
    if earlier:
        evidence.record(state, earlier[0], commit, out)
        if len(earlier) >= MAX_COMMITS_PER_SENDER:
            return
    votes[(commit.sender, commit.digest)] = commit
    if state.active and commit.view == state.view:
        advance(state, commit.seq, now, out)
    else:
        check_decided(state, commit.seq, commit.view, now, out)


def advance(state: ReplicaState, seq: int, now: float, out: list[Send]) -> None:
    """Send our commit once prepared in the current view, then see if the slot decided.

    A primary's commit follows its own pre-prepare, which is never signed twice for one
    slot (`assign_pending`), so only a backup asks `may_sign` first."""
    slot = state.log.get(seq)
    view = state.view
    if slot is None or not state.active or view not in slot.pre_prepares:
        return
    digest = slot.pre_prepares[view].digest
    if (
        view not in slot.sent_commit
        and prepared_digest(state, slot, view) == digest
        and (state.is_primary or may_sign(state, view, seq))
    ):
        slot.sent_commit.add(view)
        note_signed(state, view, seq)
        commit = sign(
            state,
            Commit(sender=state.me, epoch=state.config.epoch, view=view, seq=seq, digest=digest),
        )
        slot.commits.setdefault(view, {})[(state.me, digest)] = commit
        out.append(Send(None, commit))
    check_decided(state, seq, view, now, out)


def check_decided(state: ReplicaState, seq: int, view: int, now: float, out: list[Send]) -> None:
    """A pre-prepare plus 2f+1 matching commits of its view is a commit certificate.

    2f+1 commits include f+1 honest replicas that prepared the value, which is PBFT's
    `committed` predicate; so executing it is safe whatever this replica's own view, even
    if the primary told this replica something else.
    """
    slot = state.log.get(seq)
    if slot is None or slot.decided is not None:
        return
    tally: dict[bytes, int] = {}
    for _, digest in slot.commits.get(view, {}):
        tally[digest] = tally.get(digest, 0) + 1
    for digest, votes in tally.items():
        if votes < state.config.quorum:
            continue
        pp = slot.pre_prepares.get(view)
        pp = pp if pp is not None and pp.digest == digest else slot.others.get((view, digest))
        if pp is not None:
            slot.decided = pp
            execute_ready(state, now, out)
            return


# --- execution and checkpoints ----------------------------------------------------------


def execute_ready(state: ReplicaState, now: float, out: list[Send]) -> None:
    """Execute committed slots in sequence order; a gap waits (or is state-transferred)."""
    while not state.held:  # a membership change waits for its owner (`pbft_members`)
        slot = state.log.get(state.last_executed + 1)
        if slot is None or slot.decided is None or state.low > state.last_executed:
            return
        apply_entry(state, slot.decided, now, out, reply=True)


def apply_entry(
    state: ReplicaState, pp: PrePrepare, now: float, out: list[Send], *, reply: bool
) -> None:
    """Append one decided entry to the log; a repeated request is ordered but not re-run."""
    seq = state.last_executed + 1
    state.progress_at = now
    state.executed.append(pp)
    state.digests.append(chain(state.digests[-1], seq, pp.digest))
    state.last_executed = seq
    request = pp.request
    if request is not None:
        key = request_key(request)
        if key not in state.replies:
            answer = Reply(
                sender=state.me,
                epoch=state.config.epoch,
                view=state.view,
                client=request.sender,
                timestamp=request.timestamp,
                seq=seq,
                digest=pp.digest,
            )
            if reply:  # signed when sent: transferred entries may never need it
                answer = sign(state, answer)
                out.append(Send(request.sender, answer))
            state.replies[key] = answer
        state.pending.pop(key, None)
        state.relayed.pop(key, None)
        rearm_timer(state, now)
        barrier = state.config.barrier
        if barrier is not None and barrier(request):
            state.held = seq
    if seq % state.config.checkpoint_interval == 0:
        vote = sign(
            state,
            CheckpointVote(
                sender=state.me, epoch=state.config.epoch, seq=seq, digest=state.digests[-1]
            ),
        )
        out.append(Send(None, vote))
        on_checkpoint(state, vote, now, out)


def on_checkpoint(state: ReplicaState, vote: CheckpointVote, now: float, out: list[Send]) -> None:
    if not in_window(state, vote.seq) or vote.seq % state.config.checkpoint_interval:
        return
    votes = state.checkpoint_votes.setdefault(vote.seq, {})
    earlier = votes.get(vote.sender)
    if earlier is not None:
        if earlier.digest != vote.digest:
            evidence.record(state, earlier, vote, out)
        return
    votes[vote.sender] = vote
    ours = digest_at(state, vote.seq)
    if ours is not None and ours != vote.digest:
        note_divergence(state, vote.sender, vote.seq, vote.digest)
    matching = [v for v in votes.values() if v.digest == vote.digest]
    if len(matching) >= state.config.quorum:
        proof = tuple(sorted(matching, key=lambda v: v.sender))
        set_stable(state, vote.seq, vote.digest, proof, now, out)
        assign_pending(state, now, out)  # the window moved


def note_divergence(state: ReplicaState, peer: NodeId, seq: int, theirs: bytes) -> None:
    ours = digest_at(state, seq)
    if ours is not None and all(a.peer != peer or a.seq != seq for a in state.alarms):
        state.alarms.append(Divergence(peer, seq, ours, theirs))


def set_stable(
    state: ReplicaState,
    seq: int,
    digest: bytes,
    proof: tuple[CheckpointVote, ...],
    now: float,
    out: list[Send],
) -> None:
    """Advance the low water mark and drop the log below it (PBFT section 4.3).

    Pre-prepares we accepted but never executed are kept aside (`orphans`) until a state
    transfer covers their slots, so equivocation there can still be proven.
    """
    if seq <= state.low:
        return
    ours = digest_at(state, seq)
    if ours is not None and ours != digest:
        return  # 2f+1 signed another history than ours: only possible beyond f; alarmed
    state.low, state.stable_digest, state.stable_proof = seq, digest, proof
    for s in [s for s in state.log if s <= seq]:
        slot = state.log.pop(s)
        if s > state.last_executed:
            for pp in slot.pre_prepares.values():
                state.orphans[(pp.view, pp.seq)] = pp.header()
    for s in [s for s in state.checkpoint_votes if s <= seq]:
        del state.checkpoint_votes[s]
    state.next_seq = max(state.next_seq, seq + 1)
    if state.last_executed < seq:  # we lag: ask peers for the certified prefix now
        out.append(Send(None, sign(state, status_of(state))))


def prune(state: ReplicaState, delivered: int) -> int:
    """Drop what no replica needs any more: the executed entries and log digests, and the
    replies of the requests executed, at or below the stable checkpoint (PBFT's garbage
    collection, section 4.3), less `history` entries kept for state transfer to replicas
    that lag. `delivered`: the entries the owner has taken from `executed` (nothing it has
    not taken goes). Returns how many entries went.

    A pruned reply leaves its client's timestamp as a floor: a request at or below it is
    a replay and is not ordered again (`stale_request`). A replica that lags by more than
    `history` entries can no longer be brought forward by this one's state transfer.
    """
    target = min(state.low, delivered) - state.config.history
    drop = target - state.base
    if drop <= 0:
        return 0
    gone, state.executed = state.executed[:drop], state.executed[drop:]
    state.digests = state.digests[drop:]
    state.base = target
    for pp in gone:
        if pp.request is None:
            continue
        key = request_key(pp.request)
        if state.replies.pop(key, None) is not None:
            client, ts = key
            state.reply_floor[client] = max(state.reply_floor.get(client, -1), ts)
    state.orphans = {k: v for k, v in state.orphans.items() if k[1] > target}
    return drop
