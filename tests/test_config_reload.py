"""The config manager: classification, subscribers, history, proposals, the file watcher."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from butterfly.config import (
    ButterflyConfig,
    ConfigHistory,
    ConfigInvalid,
    ConfigManager,
    Proposal,
    UpdateRefused,
    UpdateRejected,
    apply_patch,
    check_proposal,
    cluster_hash,
    config_hash,
    follow_files,
    load,
    load_config,
    propose_update,
    reload_files,
    rollback_target,
)
from butterfly.types.errors import ConfigError

Calls = list[tuple[str, str, str]]


def recorder(calls: Calls, name: str):  # type: ignore[no-untyped-def]
    def on_change(old: ButterflyConfig, new: ButterflyConfig) -> None:
        calls.append((name, old.observability.log_level, new.observability.log_level))

    return on_change


def refuse(old: ButterflyConfig, new: ButterflyConfig) -> None:
    raise RuntimeError("cannot resize the pool now")


def test_dynamic_local_change_applies_at_once_and_is_a_new_version() -> None:
    manager = ConfigManager(load_config())
    calls: Calls = []
    manager.subscribe("logger", recorder(calls, "logger"))
    result = manager.update({"observability.log_level": "debug", "api.rate_limit": 5.0})
    assert manager.current.observability.log_level == "debug"
    assert manager.current.api.rate_limit == 5.0
    assert result.pending is None and result.version == 2
    assert {c.key for c in result.applied} == {"observability.log_level", "api.rate_limit"}
    assert calls == [("logger", "info", "debug")]


def test_static_change_is_refused_naming_the_keys_and_nothing_applies() -> None:
    manager = ConfigManager(load_config())
    before = manager.record
    with pytest.raises(
        UpdateRefused, match=re.escape("restart required: cluster.id, node.listen")
    ) as e:
        manager.update(
            {
                "node.listen": "127.0.0.1:9100",
                "cluster.id": "c2",
                "observability.log_level": "error",
            }
        )
    assert e.value.keys == ("cluster.id", "node.listen")
    assert manager.current.observability.log_level == "info"
    assert manager.record == before


def test_invalid_update_is_refused_with_the_rule() -> None:
    manager = ConfigManager(load_config())
    with pytest.raises(ConfigInvalid, match="range"):
        manager.update({"scheduling.max_queue": 0})
    with pytest.raises(ConfigInvalid, match=re.escape("did you mean scheduling.max_queue")):
        manager.update({"scheduling.max_queue_size": 10})


def test_subscriber_rejection_rolls_back_everyone() -> None:
    manager = ConfigManager(load_config())
    calls: Calls = []
    manager.subscribe("first", recorder(calls, "first"))
    manager.subscribe("pool", refuse)
    manager.subscribe("last", recorder(calls, "last"))
    before = manager.record
    with pytest.raises(UpdateRejected, match="pool: cannot resize") as e:
        manager.update({"observability.log_level": "debug"})
    assert e.value.subscriber == "pool"
    assert calls == [("first", "info", "debug"), ("first", "debug", "info")]
    assert manager.current.observability.log_level == "info"
    assert manager.record == before and manager.history.latest() == before


def test_a_check_vetoes_before_anyone_applies_and_unsubscribe_works() -> None:
    manager = ConfigManager(load_config())
    calls: Calls = []
    manager.subscribe("first", recorder(calls, "first"))
    unsubscribe = manager.subscribe("veto", recorder(calls, "veto"), check=refuse)
    with pytest.raises(UpdateRejected):
        manager.update({"observability.log_level": "debug"})
    assert calls == []
    unsubscribe()
    manager.update({"observability.log_level": "debug"})
    assert calls == [("first", "info", "debug")]


def test_consensus_change_is_proposed_not_applied_then_committed() -> None:
    manager = ConfigManager(load_config())
    result = manager.update({"partition.strategy": "uniform", "observability.log_level": "debug"})
    assert manager.current.partition.strategy == "load_balanced"
    assert manager.current.observability.log_level == "debug"
    proposal = result.pending
    assert proposal is not None and proposal.keys == ("partition.strategy",)
    assert manager.prepare(proposal).ok
    committed = manager.apply_committed(proposal, seq=1)
    assert manager.current.partition.strategy == "uniform"
    assert committed.version == 3 and manager.record.cluster_seq == 1
    again = manager.apply_committed(proposal, seq=1)  # redelivered: no new version
    assert again.version == 3 and again.applied == ()
    with pytest.raises(UpdateRefused, match="apply in order"):
        manager.apply_committed(proposal, seq=0)


def test_two_conflicting_proposals_on_one_base_only_the_first_commits() -> None:
    node_a, node_b = ConfigManager(load_config()), ConfigManager(load_config())
    base = node_a.current
    uniform = propose_update(base, {"partition.strategy": "uniform"})
    hybrid = propose_update(base, {"partition.strategy": "hybrid"})
    for node in (node_a, node_b):
        assert node.prepare(uniform).ok and node.prepare(hybrid).ok
        node.apply_committed(uniform, seq=1)
        vote = node.prepare(hybrid)
        assert not vote.ok and "stale proposal" in vote.reason
        with pytest.raises(UpdateRefused, match="stale"):
            node.apply_committed(hybrid, seq=2)
    assert cluster_hash(node_a.current) == cluster_hash(node_b.current)


def test_proposals_are_checked_like_peer_input() -> None:
    cfg = load_config()
    proposal = propose_update(cfg, {"byzantine.audit_fraction": 0.25}, reason="cheaper")
    assert Proposal.from_wire(proposal.to_wire()) == proposal
    assert check_proposal(cfg, proposal).byzantine.audit_fraction == 0.25
    forged = Proposal("update", proposal.base_cluster_hash, (("byzantine.audit_fraction", 0.5),),
                      proposal.new_cluster_hash)  # fmt: skip
    with pytest.raises(UpdateRefused, match="hash mismatch"):
        check_proposal(cfg, forged)
    sneaky = Proposal("update", proposal.base_cluster_hash, (("byzantine.f", 3),), "x")
    with pytest.raises(UpdateRefused, match="outside dynamic-consensus"):
        check_proposal(cfg, sneaky)
    with pytest.raises(UpdateRefused, match="malformed"):
        Proposal.from_wire({"kind": "update", "changes": 5})
    with pytest.raises(UpdateRefused, match="node-local"):
        propose_update(cfg, {"api.rate_limit": 1.0})
    with pytest.raises(UpdateRefused, match="restart required"):
        propose_update(cfg, {"cluster.id": "other"})


def test_sync_adopts_the_cluster_settings() -> None:
    behind = ConfigManager(load_config())
    ahead = apply_patch(behind.current, {"scheduling.policy": "priority", "byzantine.rtol": 0.01})
    values = {"scheduling.policy": "priority", "byzantine.rtol": 0.01}
    with pytest.raises(UpdateRefused, match="node-local"):
        behind.sync_to({"api.port": 1}, seq=5, expected_hash=cluster_hash(ahead))
    behind.sync_to(values, seq=5, expected_hash=cluster_hash(ahead))
    assert cluster_hash(behind.current) == cluster_hash(ahead)
    assert behind.history.last_cluster_seq() == 5


def test_history_diff_and_rollback_in_a_real_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "data" / "config" / "history.sqlite3"
    with ConfigHistory(db) as history:
        manager = ConfigManager(load_config(), history)
        v1 = manager.record
        manager.update({"observability.log_level": "debug"})
        manager.update({"scheduling.max_queue": 50})
        result = manager.rollback(1)
        assert result.version == 4
        assert manager.current == history.config_at(1)
    with ConfigHistory(db) as reopened:
        records = reopened.versions()
        assert [r.version for r in records] == [4, 3, 2, 1]
        assert (
            records[0].config_hash == v1.config_hash
            and "rollback to version 1" in records[0].reason
        )
        assert [(c.key, c.old, c.new) for c in reopened.diff(2, 3)] == [
            ("scheduling.max_queue", 1000, 50)
        ]
        assert {c.key for c in reopened.diff(1, 3)} == {
            "observability.log_level",
            "scheduling.max_queue",
        }
        assert reopened.versions(limit=1) == records[:1]
        with pytest.raises(UpdateRefused, match="no config version 9"):
            reopened.config_at(9)
        # A restart with the same config reuses the latest version instead of adding one.
        assert ConfigManager(reopened.config_at(4), reopened).record.version == 4


def test_rollback_across_a_static_change_needs_a_restart(tmp_path: Path) -> None:
    with ConfigHistory(tmp_path / "h.sqlite3") as history:
        ConfigManager(load_config(), history)
        restarted = ConfigManager(load_config(overrides=["node.listen=127.0.0.1:9001"]), history)
        with pytest.raises(UpdateRefused, match=re.escape("restart required: node.listen")):
            restarted.rollback(1)


FOUR = '["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]'
FIVE = '["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4", "127.0.0.1:5"]'


def test_rollback_keeps_the_roster_and_rolls_back_the_rest(tmp_path: Path) -> None:
    """The roster moves only through the agreement (add/remove-member): a rollback to a
    version from before a member was added keeps the member and rolls back the rest."""
    with ConfigHistory(tmp_path / "h.sqlite3") as history:
        ConfigManager(load_config(overrides=[f"cluster.members={FOUR}"]), history)
        grown = load_config(overrides=[f"cluster.members={FIVE}", "observability.log_level=debug"])
        manager = ConfigManager(grown, history, source="cluster seq 1")
        result = manager.rollback(1)
        assert result.pending is None  # no cluster-wide change left to agree
        assert [c.key for c in result.applied] == ["observability.log_level"]
        assert manager.current.cluster.members == grown.cluster.members
        assert manager.current.observability.log_level == "info"
        # the agreed path takes the same target, and keeps static options besides
        alone = load_config(overrides=["node.listen=127.0.0.1:9001"])
        target = rollback_target(alone, history.config_at(1), keep_static=True)
        assert target.cluster.members == () and target.node.listen == "127.0.0.1:9001"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def write_until(done: Callable[[], bool], path: Path, text: str) -> None:
    """Write `text` to `path` until `done()` (a watcher may start after a write),
    bounded."""
    for _ in range(500):
        write_atomically(path, text)
        for _ in range(10):
            await asyncio.sleep(0.02)
            if done():
                return
    raise AssertionError(f"never saw {text!r} in {path} applied or refused")


def test_reload_of_a_corrupted_file_raises_and_keeps_the_config(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[observability]\nlog_level = "info"\n')
    manager = ConfigManager(load_config([path]))
    before = manager.record
    path.write_text('[observability\nlog_level = "debug"\n')
    with pytest.raises(ConfigInvalid, match="not valid TOML"):
        reload_files(manager, [path], since=None)
    assert manager.record == before


def test_a_reload_applies_what_the_edit_moved_not_the_file_whole(tmp_path: Path) -> None:
    """A touch, or a save of the same text, changed every node option an update had set
    back to the file's (a token required through the API was gone); an edit moves only
    what it edits."""
    path = tmp_path / "node.toml"
    path.write_text('[observability]\nlog_level = "info"\n')
    manager = ConfigManager(load_config([path]))
    since = load([path])
    manager.update({"api.tokens": ["secret"], "scheduling.max_new_tokens_limit": 100})
    result, since = reload_files(manager, [path], since=since)  # touched: nothing moved
    assert result is None and manager.current.api.tokens == ("secret",)
    path.write_text('[observability]\nlog_level = "debug"\n')
    result, since = reload_files(manager, [path], since=since)
    assert result is not None and [c.key for c in result.applied] == ["observability.log_level"]
    assert manager.current.api.tokens == ("secret",)
    assert manager.current.scheduling.max_new_tokens_limit == 100
    path.write_text('[observability]\nlog_level = "debug"\n[api]\ntokens = ["filed"]\n')
    reload_files(manager, [path], since=since)  # the file's own edit of it does move it
    assert manager.current.api.tokens == ("filed",)


async def test_a_followed_file_applies_edits_and_keeps_the_config_on_a_bad_one(
    tmp_path: Path,
) -> None:
    """What a running node does with its files (`butterfly start` follows them): a
    corrupt edit or one of a static key leaves the running config; a good one applies."""
    path = tmp_path / "node.toml"
    path.write_text('[observability]\nlog_level = "info"\n')
    manager = ConfigManager(load_config([path]))
    before = manager.record
    errors: list[ConfigError] = []
    stop = asyncio.Event()
    follow = asyncio.create_task(
        follow_files(manager, [path], stop=stop, on_error=errors.append, debounce_ms=20)
    )

    try:
        bad = "[observability\n"
        await write_until(lambda: any("not valid TOML" in str(e) for e in errors), path, bad)
        assert manager.record == before and manager.current.observability.log_level == "info"
        static = '[node]\nlisten = "127.0.0.1:9999"\n'
        await write_until(
            lambda: any("restart required: node.listen" in str(e) for e in errors), path, static
        )
        assert manager.record == before
        good = '[observability]\nlog_level = "debug"\n'
        await write_until(lambda: manager.current.observability.log_level == "debug", path, good)
    finally:
        stop.set()
        await asyncio.wait_for(follow, 10)
    assert manager.record.version == before.version + 1
    assert config_hash(manager.current) == manager.record.config_hash


async def test_an_include_added_in_another_directory_is_followed_from_then_on(
    tmp_path: Path,
) -> None:
    """It was read once, then its own edits went unseen (only the first files'
    directories were watched)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "secrets").mkdir()
    path, tokens = tmp_path / "etc" / "node.toml", tmp_path / "secrets" / "tokens.toml"
    path.write_text('[observability]\nlog_level = "info"\n')
    tokens.write_text('[api]\ntokens = ["one"]\n')
    manager = ConfigManager(load_config([path]))
    stop = asyncio.Event()
    follow = asyncio.create_task(follow_files(manager, [path], stop=stop, debounce_ms=20))

    try:
        edit = 'include = ["../secrets/tokens.toml"]\n[observability]\nlog_level = "info"\n'
        await write_until(lambda: manager.current.api.tokens == ("one",), path, edit)
        two = '[api]\ntokens = ["two"]\n'
        await write_until(lambda: manager.current.api.tokens == ("two",), tokens, two)
    finally:
        stop.set()
        await asyncio.wait_for(follow, 10)


def test_a_corrupt_history_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match=re.escape(str(db))):
        ConfigHistory(db)
