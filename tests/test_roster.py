"""The roster's rules (`config.roster`): tombstones, keys, n >= 3f+1 over live members."""

from __future__ import annotations

from typing import Any

import pytest

from butterfly.config import ButterflyConfig
from butterfly.config.gateways import api_port, gateway_nodes, gateway_urls
from butterfly.config.roster import (
    Roster,
    add_member,
    live_ids,
    remove_member,
    roster_change,
    valid_key,
)
from butterfly.config.validate import cross_check
from butterfly.protocol.sign import SigningKey
from butterfly.types.ids import NodeId

KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32).public.hex() for i in range(8)]
ADDRS = [f"127.0.0.1:{9000 + i}" for i in range(8)]


def cluster(members: list[str], keys: list[str], f: int = 1, **more: Any) -> ButterflyConfig:
    return ButterflyConfig.model_validate(
        {"cluster": {"members": members, "public_keys": keys, **more}, "byzantine": {"f": f}}
    )


FOUR = cluster(ADDRS[:4], KEYS[:4])
GATEWAY = NodeId(0)


def patched(cfg: ButterflyConfig, patch: dict[str, list[str]]) -> ButterflyConfig:
    return cluster(patch["cluster.members"], patch["cluster.public_keys"], cfg.byzantine.f)


def rules(cfg: ButterflyConfig) -> set[str]:
    return {issue.rule for issue in cross_check(cfg)}


def test_an_added_member_is_appended_and_a_removed_one_leaves_a_tombstone() -> None:
    five = patched(FOUR, add_member(FOUR, ADDRS[4], KEYS[4]))
    assert roster_change(FOUR, five, GATEWAY) is None
    assert live_ids(five) == (0, 1, 2, 3, 4)
    without_3 = patched(five, remove_member(five, NodeId(3)))
    assert without_3.cluster.members[3] == "" and without_3.cluster.public_keys[3] == ""
    assert roster_change(five, without_3, GATEWAY) is None
    assert live_ids(without_3) == (0, 1, 2, 4)
    assert rules(without_3) == set()  # 4 live members: f = 1 holds
    with pytest.raises(ValueError, match="not a member"):
        remove_member(without_3, NodeId(3))


def test_n_counts_live_members_for_3f_plus_1() -> None:
    removed = cluster([*ADDRS[:3], ""], [*KEYS[:3], ""])
    assert "n >= 3f+1" in rules(removed)  # 3 live members cannot tolerate f = 1
    assert "n >= 3f+1" not in rules(cluster([*ADDRS[:3], ""], [*KEYS[:3], ""], f=0))


def test_a_tombstone_is_in_both_lists() -> None:
    half = cluster([*ADDRS[:4], ""], KEYS[:5])
    assert "tombstones in both lists" in rules(half)


def test_refused_changes_name_the_rule() -> None:
    five = patched(FOUR, add_member(FOUR, ADDRS[4], KEYS[4]))
    without_3 = patched(five, remove_member(five, NodeId(3)))
    refused = {
        "reused": cluster([*ADDRS[:3], ADDRS[6], ADDRS[4]], [*KEYS[:3], KEYS[6], KEYS[4]]),
        "reindexed": cluster([ADDRS[0], ADDRS[1], ADDRS[2], ADDRS[4]], [*KEYS[:3], KEYS[4]]),
        "rekeyed": cluster(ADDRS[:5], [*KEYS[:3], KEYS[7], KEYS[4]]),
        "same key": patched(five, add_member(five, ADDRS[5], KEYS[2])),
        "bad key": patched(five, add_member(five, ADDRS[5], "ff" * 31 + "7f")),  # y >= p
        "gateway": patched(five, remove_member(five, NodeId(0))),
    }
    start = {"reused": without_3, "reindexed": five, "rekeyed": five}
    reasons = {
        name: roster_change(start.get(name, five), new, GATEWAY) for name, new in refused.items()
    }
    assert "never reused" in str(reasons["reused"])
    assert "never dropped or reindexed" in str(reasons["reindexed"])
    assert "remove it and add it again" in str(reasons["rekeyed"])
    assert "another member's" in str(reasons["same key"])
    assert "valid Ed25519" in str(reasons["bad key"])
    assert "acting gateway" in str(reasons["gateway"])


def test_a_standby_gateway_may_be_removed_and_the_others_keep_their_ports() -> None:
    """Gateways 0, 1, 2 (ports api.port + 0, 1, 2): removing standby 1 takes it out of
    the takeover order; node 2 keeps its port, so clients' address lists stay right."""
    five = cluster(ADDRS[:5], KEYS[:5], gateways=[0, 1, 2])
    five = ButterflyConfig.model_validate({**five.model_dump(mode="json"), "api": {"port": 8080}})
    without_1 = ButterflyConfig.model_validate(
        {
            **five.model_dump(mode="json"),
            "cluster": {
                **five.cluster.model_dump(mode="json"),
                **{k.split(".")[1]: v for k, v in remove_member(five, NodeId(1)).items()},
            },
        }
    )
    assert roster_change(five, without_1, GATEWAY) is None
    assert gateway_nodes(five) == (0, 1, 2) and gateway_nodes(without_1) == (0, 2)
    assert api_port(without_1, NodeId(2)) == api_port(five, NodeId(2)) == 8082
    assert list(gateway_urls(without_1)) == [0, 2]
    # the default set (the first max(2, f + 1) members) shrinks too: no one is promoted
    default = patched(FOUR, remove_member(FOUR, NodeId(1)))
    assert gateway_nodes(FOUR) == (0, 1) and gateway_nodes(default) == (0,)


def test_key_validity_is_a_point_on_the_curve() -> None:
    assert valid_key(KEYS[0])
    assert not valid_key("zz" * 32)
    assert not valid_key("ff" * 31 + "7f")
    assert not valid_key("ab" * 16)


def test_the_roster_follows_an_applied_change_in_place() -> None:
    roster = Roster(FOUR, tuple(bytes.fromhex(k) for k in KEYS[:4]))
    addresses, keys = roster.addresses, roster.keys  # what the parts were handed
    told: list[tuple[NodeId, ...]] = []
    roster.listen(lambda r: told.append(r.ids))
    five = patched(FOUR, add_member(FOUR, ADDRS[4], KEYS[4]))
    assert roster.update(five) and not roster.update(five)
    without_3 = patched(five, remove_member(five, NodeId(3)))
    assert roster.update(without_3)
    assert told == [(0, 1, 2, 3, 4), (0, 1, 2, 4)]
    assert sorted(addresses) == [0, 1, 2, 4] and sorted(keys) == [0, 1, 2, 4]
    assert roster.slots[3] == b"" and len(roster.slots) == 5
