"""Quorum sizes for any cluster size: two quorums always share an honest node, and one
still forms with f members silent. 2f + 1 alone held only at n = 3f + 1."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from butterfly.protocol.pbft_state import PbftConfig
from butterfly.protocol.quorum import quorum


@given(st.integers(1, 20), st.integers(0, 40))
def test_two_quorums_share_an_honest_node_and_one_forms_with_f_silent(f: int, extra: int) -> None:
    n = 3 * f + 1 + extra
    q = quorum(n, f)
    assert 2 * q - n >= f + 1  # the overlap of any two quorums outnumbers the liars
    assert q <= n - f  # live: the honest members alone reach it


def test_five_nodes_with_one_liar_need_four_votes() -> None:
    """Two sets of 3 of 5 can meet in one node: the liar could vote for both values."""
    assert quorum(5, 1) == 4
    assert quorum(4, 1) == 3 and quorum(7, 2) == 5


def test_with_no_liar_tolerated_a_majority_decides() -> None:
    """f = 0 still needs two quorums to meet: a node cut off alone (or a minority) must
    not decide what the rest never saw (tests/test_inprocess_gateway_failover.py)."""
    assert [quorum(n, 0) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 2, 3, 3, 4, 4]
    for n in range(1, 30):
        assert 2 * quorum(n, 0) > n


def test_the_replicas_of_a_five_node_cluster_wait_for_four() -> None:
    cfg = PbftConfig(replica=0, keys=tuple(bytes([i]) * 32 for i in range(5)), f=1)
    assert cfg.quorum == 4
