"""What `cluster up` does when one of its node processes exits: report it and restart it.

The local cluster is the one `make run` starts; it stopped every node as soon as one
exited, so it was not fault tolerant at all. Now a node that exits is reported (its
exit code and log file) and started again from its config after a backoff that grows
with each restart of that node, while the others keep serving (one whose setup stopped it
is reported and left down: it would only fail again). The policy is a pure
function of the restart history, tested without processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from butterfly.wiring.supervise import restart_delay

CANNOT_START = 2
"""A node's exit code when its setup stops it (a key, a certificate, a model it cannot
load): starting it again would fail the same way, so it is reported and left down."""
FIRST_RESTART_S = 1.0
MAX_RESTART_S = 30.0
STABLE_S = 60.0
"""A node that ran this long since its last restart starts its backoff over."""


@dataclass
class Restarts:
    """Per node: restarts so far, when it was last started, when it may start again."""

    count: dict[int, int] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)
    due: dict[int, float] = field(default_factory=dict)


def plan_restarts(
    dead: Mapping[int, int], history: Restarts, now: float
) -> tuple[dict[int, float], list[int]]:
    """(newly dead nodes with the time each may start again, dead nodes to start now).

    Pure apart from updating `history`, so the backoff is tested without processes. A
    node that exited with `CANNOT_START` is due never (`math.inf`).
    """
    noticed: dict[int, float] = {}
    start = []
    for node in sorted(dead):
        if node not in history.due and dead[node] == CANNOT_START:
            history.due[node] = noticed[node] = math.inf
        elif node not in history.due:
            ran = now - history.started.get(node, float("-inf"))
            count = 1 if ran >= STABLE_S else history.count.get(node, 0) + 1
            history.count[node] = count
            history.due[node] = noticed[node] = now + restart_delay(
                count, FIRST_RESTART_S, MAX_RESTART_S
            )
        elif now >= history.due[node]:
            del history.due[node]
            history.started[node] = now
            start.append(node)
    return noticed, start


def keep_alive(
    dead: Callable[[], Mapping[int, int]],
    restart: Callable[[int], None],
    report: Callable[[str], None],
    history: Restarts,
    now: float,
) -> None:
    """One pass of `cluster up`'s watch loop: report new deaths, restart those due."""
    exits = dead()
    noticed, start = plan_restarts(exits, history, now)
    for node, due in noticed.items():
        if due == math.inf:
            report(
                f"node {node} cannot start (exit code {exits[node]}, the reason is in its "
                "log); not restarting it, the others keep serving"
            )
        else:
            report(
                f"node {node} exited with code {exits[node]}; restarting it in {due - now:.0f} s"
            )
    for node in start:
        restart(node)
        report(f"node {node} restarted")


__all__ = ["CANNOT_START", "Restarts", "keep_alive", "plan_restarts"]
