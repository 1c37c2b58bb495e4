"""Vetoes: a slot of the current primary's that its backups refuse to prepare.

A backup declines to prepare a request its own view of the cluster refuses
(`PbftConfig.veto`: a takeover of a gateway it still hears). When enough backups decline
one, that slot never prepares, and every slot after it waits, since execution is in
order. Castro and Liskov's way out is the request timer, then a view change whose new
primary fills the slot with a null request; in a cluster that timer is 10 s
(`coordination.view_change_timeout_ms`), and it stalled every plan and eviction ordered
after the slot (a standby gateway that was also the primary, cut from the acting
gateway alone, proposed a takeover its peers refused: `tests/test_partition_primary_link.py`).

So each backup that still declines a pre-prepare `PbftConfig.veto_grace` after it came
says so, signed (`Veto`), and a replica that holds
`veto_quorum` vetoes of one pre-prepare changes view at once. That many leave fewer than
a quorum of replicas that would prepare it, and at least one of them is honest, so
replicas do not leave a view that could still order the slot, and f liars alone cannot
make them leave one. The view change itself is PBFT's: whatever prepared anywhere is
carried into the next view.

A request the cluster refused is not waited for any longer (`pbft_order.forget`): the
replicas that leave the view over its vetoes drop it, and a replica whose own veto
refuses a request it held pending (its failure detector caught up) drops it on its next
tick. Each replica that held it would otherwise time it and, `request_timeout` later,
start a view change nobody joins (the others never held it), out of the agreement until
the others next changed view: the proposer of a vetoed takeover did so every view.
"""

from __future__ import annotations

from collections import Counter

from butterfly.protocol.pbft_order import accept_pre_prepare, forget, in_window, vetoed
from butterfly.protocol.pbft_state import (
    PbftConfig,
    ReplicaState,
    Send,
    Slot,
    prepared_digest,
    sign,
)
from butterfly.protocol.pbft_viewchange import start_view_change
from butterfly.types.wire.agreement import PrePrepare, Veto


def veto_quorum(config: PbftConfig) -> int:
    """Vetoes of one pre-prepare that leave fewer than a quorum to prepare it, at least
    one of them from an honest replica: f + 1 where n = 3f + 1."""
    return max(config.f + 1, config.n - config.quorum + 1)


def decline(state: ReplicaState, pp: PrePrepare, now: float) -> None:
    """This replica declines the current view's pre-prepare `pp`: it vetoes it once it
    still does `PbftConfig.veto_grace` later (`review`)."""
    state.log.setdefault(pp.seq, Slot()).declined.setdefault(pp.view, now)


def review(state: ReplicaState, now: float, out: list[Send]) -> None:
    """On each tick (every `retransmit_interval` while a slot waits): each pre-prepare of
    this view declined here is voted for if this replica now accepts it (its failure
    detector caught up), else vetoed once declined for `veto_grace`."""
    if not state.active:
        return
    for seq, slot in list(state.log.items()):
        since = slot.declined.get(state.view)
        pp = slot.pre_prepares.get(state.view)
        if since is None or pp is None or pp.request is None or seq <= state.last_executed:
            continue
        if vetoed(state, pp.request) is None:
            del slot.declined[state.view]
            accept_pre_prepare(state, pp, now, out)
        elif now - since >= state.config.veto_grace:
            del slot.declined[state.view]
            _veto(state, pp, now, out)


def _veto(state: ReplicaState, pp: PrePrepare, now: float, out: list[Send]) -> None:
    """Say, signed, that this replica will not prepare `pp`; once per view and slot."""
    votes = state.log.setdefault(pp.seq, Slot()).vetoes.setdefault(pp.view, {})
    if state.me in votes:
        return
    mine = sign(
        state,
        Veto(sender=state.me, epoch=state.config.epoch, view=pp.view, seq=pp.seq, digest=pp.digest),
    )
    votes[state.me] = mine
    out.append(Send(None, mine))
    settle(state, pp.seq, now, out)


def on_veto(state: ReplicaState, v: Veto, now: float, out: list[Send]) -> None:
    """Count a backup's veto of this view's slot `v.seq`; a primary never vetoes its own,
    and a sender's first veto of a view's slot is the one that counts."""
    if v.view != state.view or v.sender == state.primary or not in_window(state, v.seq):
        return
    votes = state.log.setdefault(v.seq, Slot()).vetoes.setdefault(v.view, {})
    if v.sender not in votes:
        votes[v.sender] = v
        settle(state, v.seq, now, out)


def settle(state: ReplicaState, seq: int, now: float, out: list[Send]) -> None:
    """Change view if slot `seq` of the current view has a vetoed digest at
    `veto_quorum`, unless it was decided, executed or prepared here after all."""
    slot = state.log.get(seq)
    if not state.active or slot is None or slot.decided is not None:
        return
    if seq <= state.last_executed or prepared_digest(state, slot, state.view) is not None:
        return
    counts = Counter(v.digest for v in slot.vetoes.get(state.view, {}).values())
    if not counts:
        return
    digest, votes = counts.most_common(1)[0]
    if votes < veto_quorum(state.config):
        return
    pp = slot.pre_prepares.get(state.view)
    if pp is not None and pp.request is not None and pp.digest == digest:
        forget(state, pp.request, now)
    start_view_change(state, state.view + 1, now, out)


def drop_refused(state: ReplicaState, now: float) -> None:
    """On each tick: stop waiting for pending requests this replica's own veto now
    refuses (`PbftConfig.veto`; it refused them on arrival, but its view changed since).
    Its pre-prepare of one is still logged and executes if 2f+1 others commit it."""
    if state.config.veto is None:
        return
    for request in [r for r in state.pending.values() if vetoed(state, r) is not None]:
        forget(state, request, now)
