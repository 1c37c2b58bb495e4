"""The gateway role as configured and agreed: `cluster.gateways`, the successor rule, and
who may order a takeover (control.gateway_role, agreement.authority)."""

from __future__ import annotations

import pytest

from butterfly.agreement.authority import admission, authorized
from butterfly.config import ConfigInvalid, load_config
from butterfly.config.gateways import api_port, gateway_nodes, gateway_urls
from butterfly.control.gateway_role import GatewayRole, cut_off, successor
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Request
from butterfly.types.wire.commands import NewPlan, TakeOver, encode_command

MEMBERS = "cluster.members=" + ",".join(f"10.0.0.{i}:9000" for i in range(7))


@pytest.mark.parametrize(("n", "f", "default"), [(1, 0, [0]), (4, 1, [0, 1]), (7, 2, [0, 1, 2])])
def test_the_default_gateways_are_the_first_max_2_f_plus_1_members(
    n: int, f: int, default: list[int]
) -> None:
    members = ",".join(f"h:{i + 1}" for i in range(n))
    cfg = load_config(overrides=[f"cluster.members={members}", f"byzantine.f={f}"])
    assert gateway_nodes(cfg) == tuple(default)


def test_configured_gateways_keep_their_order_and_get_ports_after_api_port() -> None:
    cfg = load_config(overrides=[MEMBERS, "cluster.gateways=3,1", "api.port=8100"])
    assert gateway_nodes(cfg) == (3, 1)
    assert api_port(cfg, NodeId(3)) == 8100 and api_port(cfg, NodeId(1)) == 8101
    assert api_port(cfg, NodeId(0)) == 8100  # not a gateway: its API port is unused
    assert gateway_urls(cfg) == {3: "http://10.0.0.3:8100", 1: "http://10.0.0.1:8101"}


@pytest.mark.parametrize(
    ("gateways", "message"),
    [("0,7", r"\[7\] is not a node id"), ("1,1", r"listed twice: \[1\]")],
)
def test_gateways_must_be_distinct_members(gateways: str, message: str) -> None:
    with pytest.raises(ConfigInvalid, match=message):
        load_config(overrides=[MEMBERS, f"cluster.gateways={gateways}"])


def test_a_gateway_api_port_may_not_be_a_member_address() -> None:
    members = "cluster.members=127.0.0.1:9000,127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003"
    with pytest.raises(ConfigInvalid, match=r"127\.0\.0\.1:9001"):
        load_config(overrides=[members, "byzantine.f=1", "api.port=9000", "node.listen=x:9"])


def test_the_successor_is_the_next_capable_node_neither_failed_nor_evicted() -> None:
    down: set[int] = {0}
    gateways = [NodeId(0), NodeId(1), NodeId(2)]
    assert successor(gateways, NodeId(0), down.__contains__, ()) == 1
    assert successor(gateways, NodeId(0), down.__contains__, {NodeId(1)}) == 2
    down.add(1)
    assert successor(gateways, NodeId(1), down.__contains__, ()) == 2  # wraps past 0
    assert successor(gateways, NodeId(2), lambda n: False, ()) is None  # 2 is alive
    down.add(2)
    assert successor(gateways, NodeId(0), down.__contains__, ()) is None


def _request(sender: int, command: TakeOver | NewPlan) -> Request:
    return Request(sender=NodeId(sender), epoch=0, timestamp=1, operation=encode_command(command))


def test_a_takeover_is_admitted_only_from_the_successor_that_every_check_sees() -> None:
    status = {n: "healthy" for n in range(4)}
    role = GatewayRole(
        gateways=(NodeId(0), NodeId(1)), status=lambda n: status[n], evicted=lambda: ()
    )
    execute = admission(role.gateway, role.refusal)  # the agreement's rule

    def admit(request: Request) -> str | None:  # and this replica's own view
        return execute(request) or role.veto(request)

    takeover = _request(1, TakeOver(NodeId(1), 1))
    # the acting gateway is alive as this replica sees it: no vote for the takeover
    assert "not failed" in (admit(takeover) or "")
    assert execute(takeover) is None  # the agreed state alone would allow it
    status[0] = "failed"
    assert admit(takeover) is None
    status[1] = "failed"  # node 1 is not the successor as this replica sees it
    assert "not the acting gateway's successor" in (admit(takeover) or "")
    status[1] = "healthy"
    # a member that is not gateway-capable never takes over, whatever it sees
    assert "not gateway-capable" in (admit(_request(2, TakeOver(NodeId(2), 1))) or "")
    # nobody takes over for another node, and a skipped term is refused
    assert admit(_request(2, TakeOver(NodeId(1), 1))) is not None
    assert "next term is 1" in (execute(_request(1, TakeOver(NodeId(1), 2))) or "")
    plan = NewPlan(Epoch(2), (1, 0, 4))
    assert execute(_request(1, plan)) is not None  # node 0 acts until the log says
    role.execute(TakeOver(NodeId(1), 1))
    assert (role.acting, role.term) == (1, 1)
    assert execute(_request(1, plan)) is None and execute(_request(0, plan)) is not None
    assert execute(takeover) is not None  # the same term twice: the first decided


def test_without_a_takeover_rule_the_role_cannot_move() -> None:
    assert authorized(TakeOver(NodeId(1), 1), NodeId(1)) is not None


@pytest.mark.parametrize(
    ("n", "f", "lost", "evicted", "refused"),
    [
        (4, 1, {1, 2}, set(), False),  # two cannot agree a takeover (a quorum is 3)
        (4, 1, {1, 2, 3}, set(), True),
        (4, 1, {1, 2}, {3}, True),  # evicted, node 3 still votes, for anything
        (4, 1, {1}, {3}, False),
        (4, 0, {1, 2}, set(), False),  # f = 0 still decides by majority: 3 of 4
        (4, 0, {1, 2, 3}, set(), True),
        (3, 0, {1, 2}, set(), True),
        (2, 0, {1}, set(), False),
        (1, 0, set(), set(), False),
        (7, 2, {1, 2, 3, 4}, set(), False),  # a quorum of 7 with f = 2 is 5
        (7, 2, {1, 2, 3, 4, 5}, set(), True),
        (7, 2, {1, 2, 3}, {4, 5}, True),  # a quorum of 7 with f = 2 is 5
    ],
)
def test_a_gateway_refuses_tasks_once_the_members_it_lost_make_a_quorum(
    n: int, f: int, lost: set[int], evicted: set[int], refused: bool
) -> None:
    members = [NodeId(i) for i in range(n)]
    why = cut_off(NodeId(0), members, lost.__contains__, {NodeId(e) for e in evicted}, f)
    assert (why is not None) is refused
    if why is not None:
        assert f"node 0 has lost {len(lost | evicted)}" in why


GRACE_S = 30.0  # coordination.never_heard_s


@pytest.mark.parametrize(
    ("status", "silent", "failed"),
    [
        ("starting", GRACE_S - 1, False),  # it may be starting a little late
        ("starting", GRACE_S, True),  # a first gateway that never came up
        ("starting", None, False),
        ("healthy", None, False),
        ("failed", None, True),
    ],
)
def test_a_member_never_heard_from_fails_for_the_role_after_a_grace(
    status: str, silent: float | None, failed: bool
) -> None:
    role = GatewayRole(
        gateways=[NodeId(0), NodeId(1)],
        status=lambda node: status if node == 0 else "healthy",
        evicted=lambda: (),
        never_heard_for=lambda node: silent if node == 0 else None,
        never_heard_s=GRACE_S,
    )
    assert role.failed(NodeId(0)) is failed
    assert role.successor() == (NodeId(1) if failed else None)
