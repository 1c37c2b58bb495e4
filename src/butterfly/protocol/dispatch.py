"""The gateway's signed dispatch of a stage step, and a stage's check of it.

A holder of the layer range before a node's used to be entitled to send it stage steps
(a replicate lane, a replay around a suspected node), with whatever entries, starts,
route and `reply_to` it chose. One liar on no route could then cut an honest node's KV
cache back and refill it with its own bytes (the audit blamed the honest node for what it
computed on them), make it answer the gateway for steps the gateway never sent it, with
records the liar had gathered from another holder (the gateway's check blamed the honest
node), or fail a client's request with errors the honest nodes raised about the liar's
malformed steps. So when results are verified, the gateway signs each step it sends (a
`wire.agreement.Dispatch`: the entries, the whole route, whom to answer, and a serial),
and a stage runs a step only under the acting gateway's dispatch, from the node before it
on that route, each of its requests newer than the last one it ran (`Serials`).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from butterfly.protocol.sign import SigningKey, sign_message, verify_message
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.wire.agreement import Dispatch, decode, encode
from butterfly.types.wire.data import StageStep

DISPATCH_MARK = "dispatch-serial"
"""The file in a node's data directory holding the serials its gateway reserved."""
RESERVE = 1 << 20
"""Serials a gateway writes down ahead of using them (`Dispatcher`): one small write per
million dispatches."""


class Dispatcher:
    """The gateway's side: each step it sends, stamped with its signed dispatch.

    Serials grow across the gateway's restarts, or a request it resumes would be refused
    by every stage as a replay (and its steps time out, charged to the route's nodes):
    they start from the clock, and never below the mark written to `mark` (a file in the
    node's data directory) before any serial under it was used, which holds when the clock
    went back across the restart."""

    def __init__(self, node: NodeId, key: SigningKey, mark: Path | None = None) -> None:
        self.node, self._key, self._mark = node, key, mark
        self._next = max(time.time_ns(), _read_mark(mark))
        self._reserved = self._next  # serials below it may be used without a write

    def _serial(self) -> int:
        serial, self._next = self._next, self._next + 1
        if self._mark is not None and serial >= self._reserved:
            self._reserved = serial + RESERVE
            _write_mark(self._mark, self._reserved)
        return serial

    def stamp(self, msg: StageStep, first: NodeId, epoch: int) -> StageStep:
        """`msg`, as sent to `first`, under the gateway's signed word for it."""
        ticket = Dispatch(
            self.node,
            Epoch(epoch),
            self._serial(),
            msg.request_ids,
            msg.steps,
            msg.starts,
            msg.lengths,
            (first, *msg.route),
            msg.reply_to,
            msg.last_only,
        )
        return replace(msg, dispatch=encode(sign_message(ticket, self._key)))


@dataclass(frozen=True)
class Refusal:
    """Why a step may not run here. `answer_to`: a gateway-capable member that validly
    signed exactly this step, to be told so with a retriable error rather than left to
    wait out its step timeout (which would count against the route's nodes): one that
    took the gateway's role before this node heard of it, or the acting gateway when the
    step is older than one this node ran (a replay, or its clock gone back across a
    restart). None otherwise: nothing vouches for whom to answer."""

    reason: str
    answer_to: NodeId | None = None


def _read_mark(mark: Path | None) -> int:
    try:
        return int(mark.read_text()) if mark is not None else 0
    except (OSError, ValueError):  # none yet (or unreadable: the clock alone)
        return 0


def _write_mark(mark: Path, value: int) -> None:
    """Atomically: a crash mid-write leaves the old mark, never a short one."""
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(str(value))
    os.replace(tmp, mark)


def dispatched(
    msg: StageStep,
    *,
    peer: NodeId,
    me: NodeId,
    gateway: NodeId,
    gateways: Collection[NodeId],
    keys: Mapping[NodeId, bytes],
    epoch: int,
) -> Dispatch | Refusal:
    """The dispatch `msg` (from the authenticated `peer`) runs under here, or why it may
    not run. `gateway`: the acting one; `gateways`: every gateway-capable node; `keys`:
    the members' public keys."""
    if not msg.dispatch:
        return Refusal("it carries no dispatch from the gateway")
    try:
        ticket = decode(msg.dispatch)
    except ButterflyError as e:
        return Refusal(f"its dispatch does not decode: {e}")
    if not isinstance(ticket, Dispatch):
        return Refusal(f"its dispatch is a {ticket.kind}")
    key = keys.get(ticket.sender)
    mine = ticket.sender == me == peer  # a gateway's step to its own stage: signed here
    if not mine and (key is None or not verify_message(ticket, key)):
        return Refusal(f"its dispatch is not signed by node {ticket.sender}")
    if ticket.epoch != epoch:
        return Refusal(f"it was dispatched for epoch {ticket.epoch}, sent in epoch {epoch}")
    if me not in ticket.route:
        return Refusal(f"its dispatched route {list(ticket.route)} does not name node {me}")
    at = ticket.route.index(me)
    before = ticket.route[at - 1] if at else ticket.sender
    if peer != before:
        return Refusal(f"node {peer} sent it; the dispatched route has node {before} before")
    sent = (msg.request_ids, msg.steps, msg.starts, msg.lengths, msg.route, msg.reply_to)
    signed = (ticket.request_ids, ticket.steps, ticket.starts, ticket.lengths)
    if sent != (*signed, ticket.route[at + 1 :], ticket.reply_to) or (
        msg.last_only != ticket.last_only
    ):
        return Refusal("it is not the step the gateway dispatched (entries, route or reply)")
    if ticket.sender != gateway:
        why = f"dispatched by node {ticket.sender}, where node {gateway} is the gateway here"
        return Refusal(why, ticket.sender if ticket.sender in gateways else None)
    return ticket


class Serials:
    """The last dispatch serial a stage ran for each request (of each gateway): a step
    runs only under a newer one, so an old dispatch, replayed, cannot cut a cache back.
    Bounded: the oldest requests are forgotten first, and each gateway's highest serial
    forgotten is kept, under which a request not remembered is refused too. A gateway's
    serials only grow (`Dispatcher`), so a step it sends later is over that floor;
    without it, a dispatch replayed once its request was forgotten (4096 later requests)
    ran again."""

    def __init__(self, limit: int = 4096) -> None:
        self._last: OrderedDict[RequestId, tuple[NodeId, int]] = OrderedDict()
        self._forgotten: dict[NodeId, int] = {}
        self._limit = limit

    def stale(self, ticket: Dispatch) -> RequestId | None:
        """The first request of `ticket` that ran under a dispatch as new, or None."""
        floor = self._forgotten.get(ticket.sender, -1)
        for rid in ticket.request_ids:
            last = self._last.get(rid)
            if last is None and ticket.serial <= floor:
                return rid
            if last is not None and last[0] == ticket.sender and last[1] >= ticket.serial:
                return rid
        return None

    def ran(self, ticket: Dispatch) -> None:
        for rid in ticket.request_ids:
            self._last[rid] = (ticket.sender, ticket.serial)
            self._last.move_to_end(rid)
        while len(self._last) > self._limit:
            _, (sender, serial) = self._last.popitem(last=False)
            self._forgotten[sender] = max(serial, self._forgotten.get(sender, -1))


__all__ = ["DISPATCH_MARK", "Dispatcher", "Refusal", "Serials", "dispatched"]
