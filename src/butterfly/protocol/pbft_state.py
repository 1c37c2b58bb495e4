"""A PBFT replica's configuration and state, and the small questions asked of them.

The state is owned by the reducer in `pbft.py`: `step` updates the state it is given and
returns it, so one replica's history is one object a driver threads through its calls.
Copying the whole log on every message would cost more than the Ed25519 checks that
dominate a step; `clone` gives an independent copy when a test or a simulation needs to
fork a replica (Twins start from one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from butterfly.protocol.quorum import check_fault_tolerance, live_members, quorum
from butterfly.protocol.sign import M, SigningKey, sign_message
from butterfly.types.errors import InsufficientNodes
from butterfly.types.hashing import chain
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    CheckpointVote,
    Commit,
    Evidence,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    StateSnapshot,
    Status,
    Veto,
    ViewChange,
)

MAX_COMMITS_PER_SENDER = 3
RequestKey = tuple[NodeId, int]
"""(client, timestamp): identifies a request across retransmissions and views."""
Authorize = Callable[[Request], str | None]
"""Why a client-signed request must not be ordered (None: it may); see `PbftConfig`."""
Barrier = Callable[[Request], bool]
"""Whether executing a request may change the replica set (`pbft_members`)."""


@dataclass(frozen=True)
class PbftConfig:
    """What every replica of one epoch must agree on; times are in seconds of `now`."""

    replica: NodeId  # this replica's id, an index into `keys`
    # Ed25519 public keys of replicas by id; b"" is a removed member's slot (a tombstone:
    # ids are never reused, so a removed replica's old votes never count for another)
    keys: tuple[bytes, ...]
    f: int  # Byzantine replicas tolerated; n >= 3f + 1 is enforced over the live members
    clients: Mapping[NodeId, bytes] = field(default_factory=dict)  # client public keys
    epoch: Epoch = Epoch(0)  # noqa: RUF009  other epochs' messages are stale, ignored
    checkpoint_interval: int = 8  # a checkpoint vote every K executed sequence numbers
    window: int = 32  # high water mark = low water mark + window
    request_timeout: float = 1.0  # a pending request older than this starts a view change
    view_change_timeout: float = 1.0  # first wait for a new view; doubles per failed view
    initial_view: int = 0  # the view, and so the primary, every replica starts in
    max_backoff: int = 8  # cap on the doubling, so a healed network recovers promptly
    # executed entries kept below the low water mark (`prune`), so a replica that lags or
    # restarts within this many entries catches up by state transfer
    history: int = 1024
    retransmit_interval: float = 0.1  # status (and so retransmission) while work is pending
    idle_status_interval: float = 1.0  # status while idle, so laggards learn they lag
    # what each client may ask for (`agreement.authority`): a request it refuses is never
    # ordered by a primary, never prepared by a backup, and skipped at execution; it must
    # be a pure function of the request, so every honest replica decides alike. None:
    # every client-signed request (benchmarks and tests ordering opaque bytes)
    authorize: Authorize | None = None
    # why this replica declines to take up a request it would otherwise admit (its own
    # view, not a function of the request alone: a takeover of a gateway its failure
    # detector sees alive). It never makes such a request pending, never orders it as
    # primary and never prepares it; it still logs it and executes it once 2f+1 others
    # have committed it, so a replica that lags or restarts catches up all the same
    veto: Authorize | None = None
    # how long a replica keeps declining a pre-prepare before it vetoes it (`pbft_veto`):
    # failure detectors fire apart, and a veto from one a beat behind its peers would end
    # the view of a takeover it is about to support; a node derives it from its detector's
    # settings (`protocol.keys.veto_grace`)
    veto_grace: float = 1.0
    # requests whose execution may change the replica set (a membership change riding on
    # a config update): execution holds after one until the owner says which replica set
    # follows (`pbft_members.resume`); None: the set never changes
    barrier: Barrier | None = None
    # the sequence number this epoch starts after and the log digest there: 0 and the
    # genesis digest for a cluster's first epoch, the executed membership change after
    start: int = 0
    start_digest: bytes = b""
    members: tuple[NodeId, ...] = field(init=False, default=())  # live replica ids, sorted

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", live_members(self.keys))
        check_fault_tolerance(len(self.members), self.f)
        if not 0 <= self.replica < len(self.keys):
            raise InsufficientNodes(
                f"replica id {self.replica} is not one of the {len(self.keys)} replicas"
            )
        if self.checkpoint_interval < 1 or self.window < self.checkpoint_interval:
            raise ValueError(
                f"window ({self.window}) must be at least the checkpoint interval "
                f"({self.checkpoint_interval}) and both positive, or the log never advances"
            )
        if self.history < 0:
            raise ValueError(f"history ({self.history}) must be 0 or more entries")
        if min(self.request_timeout, self.view_change_timeout, self.retransmit_interval) <= 0:
            raise ValueError("timeouts and intervals must be positive")

    @property
    def n(self) -> int:
        """Live replicas: what quorums and view numbers count."""
        return len(self.members)

    @property
    def quorum(self) -> int:
        return quorum(self.n, self.f)

    @property
    def genesis(self) -> bytes:
        """The log digest this epoch starts from."""
        return self.start_digest or genesis_digest(self.epoch)

    def is_member(self, node: int) -> bool:
        """A live replica of this epoch (not a removed member's tombstone, not a stranger)."""
        return 0 <= node < len(self.keys) and bool(self.keys[node])

    def primary_of(self, view: int) -> NodeId:
        """Primaries rotate over the live replicas, so a removed one is never waited for."""
        return self.members[view % len(self.members)]


@dataclass(frozen=True, slots=True)
class Send:
    """One outbound message; `to=None` means every other replica."""

    to: NodeId | None
    message: Message


@dataclass(frozen=True, slots=True)
class Divergence:
    """A peer signed a log digest that differs from ours at the same sequence number.

    Not attributable (either side may be wrong), so it is an alarm, not evidence: with at
    most f liars it only ever names a liar; beyond f it is how silent forks get reported.
    """

    peer: NodeId
    seq: int
    ours: bytes
    theirs: bytes


@dataclass(slots=True)
class Slot:
    """Everything logged for one sequence number, by view."""

    pre_prepares: dict[int, PrePrepare] = field(default_factory=dict)
    prepares: dict[int, dict[NodeId, Prepare]] = field(default_factory=dict)
    # view -> (sender, digest) -> commit: a liar's conflicting commits are all kept (up to
    # MAX_COMMITS_PER_SENDER), since the honest replicas' certificate may hold either one
    commits: dict[int, dict[tuple[NodeId, bytes], Commit]] = field(default_factory=dict)
    sent_commit: set[int] = field(default_factory=set)
    others: dict[tuple[int, bytes], PrePrepare] = field(default_factory=dict)  # equivocated
    decided: PrePrepare | None = None  # what 2f+1 commits decided for this slot
    vetoes: dict[int, dict[NodeId, Veto]] = field(default_factory=dict)  # view -> sender
    declined: dict[int, float] = field(default_factory=dict)  # view -> since when (`veto`)


@dataclass(frozen=True, slots=True)
class Signed:
    """How far a replica has signed votes for slots (pre-prepares as primary, prepares
    and commits): in `epoch`, no view above `view`, and in `view` itself no sequence
    number above `seq`. The seq is that of the highest view only, not a maximum over
    views: a new view may order from lower numbers again (after a restart of the whole
    cluster its log starts over), and a maximum over views kept a restarted backup from
    voting at (new view, seq <= old maximum) -- slots of a view it never voted in --
    which cost the cluster a voter until the next view change. Lower views need no
    number: a restarted replica starts in `view` (`new_replica`) and never votes in a
    lower one.

    The driver writes it to the node's data directory before any such vote leaves
    (`agreement.signed_mark`) and hands it back to a restarted replica (`new_replica`),
    which then never signs a vote at a (view, seq) it may have voted in before the crash
    (`may_sign`): its peers keep the old votes (the log until the first stable
    checkpoint, then `orphans`), and a second one for another digest in the same slot
    convicts it of equivocation (`evidence`) although it only restarted. For a primary
    that is any request it orders next; for a backup, the other pre-prepare of a lying
    primary (relayed to it after the restart) that it would prepare.
    """

    epoch: int
    view: int
    seq: int


UNKNOWN = 1 << 62
"""View and seq of a mark that was lost (`agreement.signed_mark`): every slot of its
epoch may have been voted in, so the replica votes in none (`may_sign`), while it still
follows the cluster's views (`new_replica`)."""


def genesis_digest(epoch: Epoch) -> bytes:
    return chain(b"butterfly-pbft-genesis", int(epoch), b"")


@dataclass(slots=True)
class ReplicaState:
    config: PbftConfig
    key: SigningKey
    view: int = 0
    in_view_change: bool = False
    low: int = 0  # last stable checkpoint (low water mark)
    stable_digest: bytes = b""
    stable_proof: tuple[CheckpointVote, ...] = ()
    last_executed: int = 0
    next_seq: int = 1  # next sequence number this replica assigns as primary
    log: dict[int, Slot] = field(default_factory=dict)
    checkpoint_votes: dict[int, dict[NodeId, CheckpointVote]] = field(default_factory=dict)
    base: int = 0  # entries up to this sequence number were pruned (`prune`)
    executed: list[PrePrepare] = field(default_factory=list)  # [i] decided seq base+i+1
    digests: list[bytes] = field(default_factory=list)  # [i]: log digest after seq base+i
    pending: dict[RequestKey, Request] = field(default_factory=dict)
    assigned: set[RequestKey] = field(default_factory=set)  # by this primary, this view
    # pending request -> the primary known to hold it: we relayed it there, or that
    # primary pre-prepared it (`pbft_order.relay`); so a backup relays a request once per
    # primary, never in a loop, and its keys are always pending ones (bounded by them)
    relayed: dict[RequestKey, NodeId] = field(default_factory=dict)
    replies: dict[RequestKey, Reply] = field(default_factory=dict)  # executed requests
    # client -> newest timestamp among the requests whose replies were pruned: an older
    # request from that client is a replay, not work
    reply_floor: dict[NodeId, int] = field(default_factory=dict)
    view_changes: dict[int, dict[NodeId, ViewChange]] = field(default_factory=dict)
    new_view: NewView | None = None  # the message that installed the current view
    orphans: dict[tuple[int, int], PrePrepare] = field(default_factory=dict)
    timer_key: RequestKey | None = None
    timer_deadline: float | None = None
    vc_deadline: float | None = None
    vc_attempt: int = 0
    status_deadline: float | None = None
    progress_at: float = -1.0  # when we last executed something
    status_answered: dict[NodeId, float] = field(default_factory=dict)  # peer -> when
    evidence: list[Evidence] = field(default_factory=list)
    evidence_keys: set[tuple[object, ...]] = field(default_factory=set)
    alarms: list[Divergence] = field(default_factory=list)
    # the driver's executed state at checkpoints (`pbft_snapshot.record`), what peers
    # offered a replica behind their pruned log, and what it installed from them (the
    # driver takes it: `installed` is then None again)
    snapshots: dict[int, bytes] = field(default_factory=dict)
    snapshot_offers: dict[NodeId, StateSnapshot] = field(default_factory=dict)
    installed: tuple[int, bytes] | None = None
    # a barrier request (`PbftConfig.barrier`) executed at this sequence number, and
    # nothing after it executes until the owner resumes (`pbft_members.resume`); 0: none
    held: int = 0
    # the previous epoch's replica, frozen at the membership change: it still relays the
    # log up to the change to a replica that has not executed it yet (`pbft_members`)
    retired: ReplicaState | None = None
    # how far this replica signed votes for slots, over its lives (the driver persists
    # it), and how far it had signed when it started (`may_sign`); None: nothing
    signed: Signed | None = None
    signed_before: Signed | None = None

    @property
    def me(self) -> NodeId:
        return self.config.replica

    @property
    def primary(self) -> NodeId:
        return self.config.primary_of(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.config.replica

    @property
    def active(self) -> bool:
        """In a view (not changing views): only then does the normal case run."""
        return not self.in_view_change


def new_replica(config: PbftConfig, key: SigningKey, signed: Signed | None = None) -> ReplicaState:
    """A replica at the start of its epoch: in its initial view, empty log, status due at
    once. `signed`: how far a previous life of this replica signed votes (what its
    driver persisted), so this one never signs another for any of those slots.

    Such a replica starts in the last view it voted in, not the initial one: the others
    are there or later (it catches up by their statuses either way), and should the
    whole cluster have restarted, one view change leads past the views in which the
    replicas may not vote (`may_sign`), where one view change per view stalled it for
    minutes.

    A lost mark (`UNKNOWN`) starts in the initial view, like no mark, and follows the
    cluster's views from its peers' statuses and new-views: it votes in no slot of this
    epoch, but it executes, joins the view changes the others need 2f+1 replicas for and
    shows in them as one of theirs. Starting in the mark's view 2**62 instead, it could
    neither, and one more crash stalled the cluster. Voting again in views above the
    highest one the cluster reached after the restart was left out, as it is not sound
    on what a replica can observe: the cluster's restarted members start in the last view
    they voted in, below the views whose view changes or new-views (from this node as
    primary) only they saw, and its own timer may fire before it hears from anyone. The
    operator's way back is a change of the member set (docs/DEPLOY.md)."""
    if key.public != config.keys[config.replica]:
        raise ValueError(f"key does not match replica {config.replica}'s public key")
    genesis = config.genesis
    view = config.initial_view
    if signed is not None and signed.epoch == config.epoch and signed.view < UNKNOWN:
        view = max(view, signed.view)
    return ReplicaState(
        config=config,
        key=key,
        view=view,
        low=config.start,
        base=config.start,
        last_executed=config.start,
        next_seq=config.start + 1,
        stable_digest=genesis,
        digests=[genesis],
        status_deadline=0.0,
        signed=signed,
        signed_before=signed,
    )


def clone(state: ReplicaState) -> ReplicaState:
    """An independent copy (the signing key is shared: it is immutable)."""
    key = state.key
    memo: dict[int, object] = {id(key): key, id(state.config): state.config}
    return copy.deepcopy(state, memo)


def digest_at(state: ReplicaState, seq: int) -> bytes | None:
    """The log digest after `seq`, or None when it was pruned or is not executed yet."""
    i = seq - state.base
    return state.digests[i] if 0 <= i < len(state.digests) else None


def entry_at(state: ReplicaState, seq: int) -> PrePrepare:
    """The executed entry of `seq`, which must be above `base` and executed."""
    if not state.base < seq <= state.last_executed:
        raise IndexError(f"seq {seq} is not held: entries {state.base + 1}..{state.last_executed}")
    return state.executed[seq - state.base - 1]


def stale_request(state: ReplicaState, request: Request) -> bool:
    """Older than a request of the same client whose reply was pruned: executed long ago
    (or overtaken); never ordered again."""
    return request.timestamp <= state.reply_floor.get(request.sender, -1)


def sign(state: ReplicaState, message: M) -> M:
    return sign_message(message, state.key)


def may_sign(state: ReplicaState, view: int, seq: int) -> bool:
    """Whether this replica may vote (pre-prepare, prepare, commit) at (view, seq):
    always, unless a previous life of it (`signed_before`) may have voted there. Then
    only a later view, or a later sequence number in the last view it voted in, is
    certainly fresh (`Signed`); an older epoch than the one it voted in is never safe
    (what it signed there is unknown). A slot it sits out is decided by the others'
    votes and executed from their commits all the same."""
    before = state.signed_before
    if before is None or state.config.epoch > before.epoch:
        return True
    return state.config.epoch == before.epoch and (
        view > before.view or (view == before.view and seq > before.seq)
    )


def note_signed(state: ReplicaState, view: int, seq: int) -> None:
    """Record a vote this replica signs at (view, seq) (`Signed`), before it leaves."""
    epoch, mark = state.config.epoch, state.signed
    if mark is None or epoch > mark.epoch:
        state.signed = Signed(epoch, view, seq)
    elif epoch == mark.epoch and view > mark.view:
        state.signed = Signed(epoch, view, seq)  # a new view: its own numbers (`Signed`)
    elif epoch == mark.epoch and view == mark.view and seq > mark.seq:
        state.signed = Signed(epoch, view, seq)


def request_key(request: Request) -> RequestKey:
    return (request.sender, request.timestamp)


def prepared_digest(state: ReplicaState, slot: Slot, view: int) -> bytes | None:
    """The digest prepared in `view`: a pre-prepare and 2f matching backup prepares."""
    pp = slot.pre_prepares.get(view)
    if pp is None:
        return None
    lead = state.config.primary_of(view)
    votes = slot.prepares.get(view, {})
    matching = sum(1 for j, p in votes.items() if j != lead and p.digest == pp.digest)
    return pp.digest if matching >= state.config.quorum - 1 else None


def busy(state: ReplicaState) -> bool:
    """Work is outstanding, so peers should hear our status often."""
    return bool(
        state.pending
        or state.in_view_change
        or state.low > state.last_executed
        or any(seq > state.last_executed for seq in state.log)
    )


def next_deadline(state: ReplicaState) -> float | None:
    """When the driver must next feed a `Tick`; None when nothing is timed."""
    times = [state.status_deadline]
    times.append(state.vc_deadline if state.in_view_change else state.timer_deadline)
    present = [t for t in times if t is not None]
    return min(present) if present else None


def status_of(state: ReplicaState) -> Status:
    return Status(
        sender=state.me,
        epoch=state.config.epoch,
        view=state.view,
        in_view_change=state.in_view_change,
        last_executed=state.last_executed,
        executed_digest=state.digests[-1],  # the digest after last_executed
        stable_seq=state.low,
    )
