"""`cluster up`'s restart policy, without processes: report once, back off, restart."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from butterfly.cli.keeper import (
    CANNOT_START,
    FIRST_RESTART_S,
    STABLE_S,
    Restarts,
    keep_alive,
    plan_restarts,
)
from butterfly.cli.launcher import LocalCluster


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


def test_a_node_whose_setup_stopped_it_is_reported_and_left_down() -> None:
    """Exit code 2 (`butterfly start` refusing its key, certificate or model) would only
    repeat: it was restarted every 30 s for as long as the cluster ran."""
    h, lines, restarted = Restarts(), [], []
    dead = {1: CANNOT_START, 2: 1}
    for now in (0.0, 1.0, 100.0, 1000.0):
        keep_alive(lambda: dead, restarted.append, lines.append, h, now)
    assert 1 not in restarted and 2 in restarted
    refused = [line for line in lines if line.startswith("node 1")]
    assert refused == [
        "node 1 cannot start (exit code 2, the reason is in its log); not restarting it, "
        "the others keep serving"
    ]


def _exiting_cluster(tmp_path: Path) -> LocalCluster:
    """Two "nodes" that exit at once with code 3, and an API nobody serves."""
    configs = [tmp_path / "a.toml", tmp_path / "b.toml"]
    cluster = LocalCluster(configs, "http://127.0.0.1:9", tmp_path)
    cluster.command = (sys.executable, "-c", "import sys; sys.exit(3)")
    return cluster


def test_a_node_dying_during_start_up_is_handed_on_rather_than_ending_the_wait(
    tmp_path: Path,
) -> None:
    """`cluster up` restarts a node that dies while the cluster starts (any n - f
    members start it); before, the first death stopped every node."""
    cluster = _exiting_cluster(tmp_path)
    cluster.start()
    try:
        with pytest.raises(RuntimeError, match="exited during start-up"):
            cluster.wait_ready(timeout_s=5.0)  # without `on_dead`: as before
        looks: list[dict[int, int]] = []
        with pytest.raises(TimeoutError):
            cluster.wait_ready(timeout_s=0.5, on_dead=lambda: looks.append(cluster.dead()))
        assert looks and looks[-1] == {0: 3, 1: 3}
    finally:
        cluster.stop(grace_s=1.0)


def test_a_stop_during_start_up_ends_the_wait_at_once(tmp_path: Path) -> None:
    cluster = _exiting_cluster(tmp_path)
    started = time.monotonic()
    cluster.wait_ready(timeout_s=30.0, stopped=lambda: True)  # no process: nothing to reap
    assert time.monotonic() - started < 5.0
