"""`cluster up`'s restart policy, without processes: report once, back off, restart."""

from __future__ import annotations

from butterfly.cli.keeper import FIRST_RESTART_S, STABLE_S, Restarts, keep_alive, plan_restarts


def test_a_dead_node_is_restarted_after_a_backoff_that_grows_until_it_stays_up() -> None:
    h = Restarts()
    assert plan_restarts({2: -9}, h, 0.0) == ({2: FIRST_RESTART_S}, [])
    assert plan_restarts({2: -9}, h, 0.5) == ({}, [])  # not yet due, not reported again
    assert plan_restarts({2: -9}, h, 1.0) == ({}, [2])
    assert plan_restarts({}, h, 1.5) == ({}, [])
    # dies again 3 s after its restart: twice the wait
    assert plan_restarts({2: 1}, h, 4.0) == ({2: 4.0 + 2 * FIRST_RESTART_S}, [])
    assert plan_restarts({2: 1}, h, 6.0) == ({}, [2])
    # ran a long time before dying: the backoff starts over
    later = 6.0 + STABLE_S + 1
    assert plan_restarts({2: 1}, h, later) == ({2: later + FIRST_RESTART_S}, [])


def test_nodes_are_handled_independently() -> None:
    h = Restarts()
    plan_restarts({1: 0}, h, 0.0)
    noticed, start = plan_restarts({1: 0, 3: -9}, h, 1.0)
    assert noticed == {3: 1.0 + FIRST_RESTART_S} and start == [1]


def test_keep_alive_reports_each_death_once_and_each_restart() -> None:
    h, lines, restarted = Restarts(), [], []
    dead = {0: -9}
    for now in (0.0, 0.5, 1.0):
        keep_alive(lambda: dead, restarted.append, lines.append, h, now)
    assert restarted == [0]
    assert lines == ["node 0 exited with code -9; restarting it in 1 s", "node 0 restarted"]
