"""Who may send each message kind: one pure rule per kind, in one table.

A frame is attributed to the peer its connection authenticated (net.handshake), never to
the sender it claims; the router drops a frame whose claimed sender differs. What is
left is whether that peer is the one entitled to send this kind, now:

    kind                  entitled peer
    stage_step            the gateway, or a holder of the layer range just before this
                          node's (the previous stage of a chain or replicate lane); where
                          records are checked, only under the acting gateway's signed
                          dispatch, from the node before this one on its route
                          (protocol.dispatch, checked by the stage server's `admit`)
    step_result           the last node of the route the step was sent on
    step_error            any node of that route
    kv_append             the chain node of that layer range in the current plan
    release, audit_request, inputs_query, cache_query, status_query,
    plan_assign, config_prepare, config_sync, config_local,
    task_copy, task_checkpoint, task_settled, task_sync
                          the gateway (the acting one, as agreed)
    ping, config_status_query, agreement
                          any member (a probe, a read, or signed inside by its author)
    replies, hello, heartbeat
                          nobody: replies resolve requests and never reach a handler;
                          hellos belong to the handshake, heartbeats to UDP

A node is entitled to everything it sends itself. The router checks every kind when it
arrives (`entitled`), except the three whose rule needs what only their handler knows:
a stage step waits for the plan of its epoch first (the gateway may switch plans a
step ahead of this node; a peer's steps waiting hold a bounded number of bytes,
dataplane.routes.EARLY_STEP_BYTES), and a result is checked entry by entry against the route
each step was sent on.
"""

from __future__ import annotations

from dataclasses import dataclass

from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import (
    AgreementFrame,
    ConfigLocal,
    ConfigPrepare,
    ConfigStatusQuery,
    ConfigSync,
    PlanAssign,
    StatusQuery,
)
from butterfly.types.wire.data import (
    AuditRequest,
    CacheQuery,
    InputsQuery,
    KvAppend,
    Ping,
    Release,
    StageStep,
    StepError,
    StepResult,
)
from butterfly.types.wire.frames import Message
from butterfly.types.wire.standby import TaskCheckpoint, TaskCopy, TaskSettled, TaskSync

FROM_GATEWAY = (
    Release,
    AuditRequest,
    InputsQuery,
    CacheQuery,
    StatusQuery,
    PlanAssign,
    ConfigPrepare,
    ConfigSync,
    ConfigLocal,
    TaskCopy,
    TaskCheckpoint,
    TaskSettled,
    TaskSync,
)
FROM_ANY_MEMBER = (Ping, ConfigStatusQuery, AgreementFrame)
CHECKED_BY_HANDLER = (StageStep, StepResult, StepError)
"""Kinds whose handler calls `entitled` itself, with the context only it has."""


@dataclass(frozen=True)
class Context:
    """What a rule may look at: who this node is, the gateway, the plan in force, and
    (results only) the route the step was sent on, gateway excluded."""

    me: NodeId
    gateway: NodeId
    plan: StagePlan | None
    sent_on: tuple[NodeId, ...] = ()


def entitled(msg: Message, peer: NodeId, ctx: Context) -> bool:
    """Whether `peer` (authenticated) may send `msg` to this node now."""
    if peer == ctx.me:
        return True
    match msg:
        case StageStep():
            return peer == ctx.gateway or peer in previous_stage(ctx.plan, ctx.me)
        case StepResult():
            return bool(ctx.sent_on) and peer == ctx.sent_on[-1]
        case StepError():
            return peer in ctx.sent_on
        case KvAppend():
            return peer == chain_node(ctx.plan, LayerRange(msg.layer_start, msg.layer_end))
        case _ if isinstance(msg, FROM_GATEWAY):
            return peer == ctx.gateway
        case _ if isinstance(msg, FROM_ANY_MEMBER):
            return True
        case _:
            return False


def previous_stage(plan: StagePlan | None, node: NodeId) -> tuple[NodeId, ...]:
    """Every holder of the range that ends where `node`'s begins (none for the first
    range, which only the gateway feeds)."""
    mine = plan.layers_of(node) if plan is not None else None
    if plan is None or mine is None:
        return ()
    before = next((r for _, r in plan.stages if r.end == mine.start), None)
    return plan.holders(before) if before is not None else ()


def chain_node(plan: StagePlan | None, layers: LayerRange) -> NodeId | None:
    """The node that runs `layers` in the plan's chain (the one copying its caches)."""
    if plan is None:
        return None
    return next((n for n, r in plan.stages if r == layers), None)


__all__ = [
    "CHECKED_BY_HANDLER",
    "FROM_ANY_MEMBER",
    "FROM_GATEWAY",
    "Context",
    "chain_node",
    "entitled",
    "previous_stage",
]
