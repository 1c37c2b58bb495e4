"""The KV table's own rules, without a stage: which cache a step gets, why a missing one
is missing, how many evictions are remembered, and the gateway's kept outputs staying
contiguous through re-runs, rollbacks and gaps."""

from __future__ import annotations

import pytest
import torch

from butterfly.dataplane import kv_table
from butterfly.dataplane.kv_table import KvTable
from butterfly.runtime.kvcache import KVCache
from butterfly.types.errors import InvalidMessage, StageLost
from butterfly.types.ids import NodeId, RequestId


def table(max_caches: int = 2) -> tuple[KvTable, list[float]]:
    now = [0.0]
    return KvTable(NodeId(1), max_caches=max_caches, ttl_s=10.0, clock=lambda: now[0]), now


def rid(name: str) -> RequestId:
    return RequestId(name)


def test_a_missing_cache_is_explained_only_when_it_was_evicted() -> None:
    t, now = table()
    for name in ("a", "b", "c"):  # the third takes the least recent: a
        t.cache_for(rid(name), 0, (rid(name),), lambda: None)
        now[0] += 1
    assert set(t.caches) == {"b", "c"}
    with pytest.raises(StageLost, match=r"evicted .*max_kv_caches"):
        t.cache_for(rid("a"), 5, (rid("a"),), lambda: None)
    with pytest.raises(InvalidMessage, match="no KV cache"):
        t.cache_for(rid("never"), 5, (rid("never"),), lambda: None)
    now[0] += 11  # both idle past the TTL
    assert t.expire() == 2 and not t.caches
    with pytest.raises(StageLost, match="idle for 12 s"):
        t.cache_for(rid("c"), 1, (rid("c"),), lambda: None)


def test_a_step_never_evicts_its_own_batch() -> None:
    t, _ = table(max_caches=1)
    t.cache_for(rid("a"), 0, (rid("a"), rid("b")), lambda: None)
    t.cache_for(rid("b"), 0, (rid("a"), rid("b")), lambda: None)
    assert set(t.caches) == {"a", "b"}  # over the cap for this step, not by evicting a


def test_evictions_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_table, "EVICTIONS_REMEMBERED", 3)
    t, _ = table()
    for i in range(5):
        t.cache_for(rid(f"r{i}"), 0, (rid(f"r{i}"),), lambda: None)
    t.drop_all("the plan moved")
    assert not t.caches
    with pytest.raises(StageLost, match="the plan moved"):
        t.cache_for(rid("r4"), 1, (rid("r4"),), lambda: None)
    with pytest.raises(InvalidMessage):  # r0 is forgotten: the oldest went first
        t.cache_for(rid("r0"), 1, (rid("r0"),), lambda: None)


def rows(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32).reshape(1, n, 1)


def keep(t: KvTable, start: int, n: int) -> None:
    t.keep((rid("r"),), (start,), (n,), rows(start, n), [0])


def test_kept_outputs_stay_contiguous_through_reruns_and_rollbacks() -> None:
    t, _ = table()
    keep(t, 0, 4)  # a prompt
    keep(t, 4, 3)  # a verify step of a draft of 2
    keep(t, 5, 1)  # the next step starts at the first rejected position: 5 and 6 go
    out = t.outputs(rid("r"), 6)
    assert out is not None and out.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    keep(t, 2, 2)  # a re-run from 2 replaces what followed
    assert t.outputs(rid("r"), 6) is None
    out = t.outputs(rid("r"), 4)
    assert out is not None and out.flatten().tolist() == [0, 1, 2, 3]
    keep(t, 9, 1)  # a gap: positions computed elsewhere after a recovery
    assert t.outputs(rid("r"), 10) is None
    t.release(rid("r"))
    assert t.outputs(rid("r"), 1) is None


def test_positions_recomputed_below_the_shipped_mark_are_shipped_again() -> None:
    """A step that cuts a cache back (a replay, a rejected draft) rewrites positions its
    standbys already hold: from there they must be copied again; a released request's
    mark goes with it, so a new request of that id starts from nothing."""
    t, _ = table()
    cache = t.cache_for(rid("a"), 0, (rid("a"),), lambda: KVCache(1, 1, 1, 2, 64))
    assert cache is not None
    cache.advance(12)
    t.mark_shipped(rid("a"), 12)
    assert t.to_ship(rid("a"), 12) == 12  # nothing new
    t.cache_for(rid("a"), 5, (rid("a"),), lambda: None)  # a re-run from 5 cuts it back
    assert cache.length == 5
    assert t.to_ship(rid("a"), 9) == 5
    t.release(rid("a"))
    assert t.to_ship(rid("a"), 3) == 0


def test_a_copy_is_the_nodes_own_once_a_step_computes_on_it() -> None:
    """A chain node's copy may be extended by more copies until a step here computes on
    it (a standby taking the stage over); a cache a step made is never a copy's."""
    t, _ = table()
    t.put_copy(rid("a"), KVCache(1, 1, 1, 2, 64), 1)
    assert not t.own(rid("a")) and not t.own(rid("b"))
    t.cache_for(rid("a"), 0, (rid("a"),), lambda: None)
    assert t.own(rid("a"))
    t.cache_for(rid("b"), 0, (rid("b"),), lambda: KVCache(1, 1, 1, 2, 64))
    assert t.own(rid("b"))
    t.release(rid("a"))
    t.put_copy(rid("a"), KVCache(1, 1, 1, 2, 64), 1)  # a new copy after the release
    assert not t.own(rid("a"))
    t.drop_all("a new plan")
    assert not t.own(rid("a")) and not t.own(rid("b"))


def copied(length: int) -> KVCache:
    cache = KVCache(1, 1, 1, 2, 64)
    cache.write(0, torch.ones(2, 1, 1, length, 2))
    return cache


def test_a_step_goes_on_from_a_copy_only_of_an_earlier_plan() -> None:
    """A standby taking the stage over goes on from copies taken under the plan before;
    a copy taken under the step's own plan is a chain node writing into a request this
    node computes beside it (after its own cache was evicted): it goes, and the request
    replays from 0 (a review)."""
    t, _ = table()
    t.put_copy(rid("a"), copied(4), 1)
    assert t.cache_for(rid("a"), 4, (rid("a"),), lambda: None, epoch=2) is not None
    assert t.own(rid("a"))  # the takeover's step made it this node's
    t.put_copy(rid("b"), copied(4), 2)
    with pytest.raises(StageLost, match="copy taken under the plan of epoch 2"):
        t.cache_for(rid("b"), 4, (rid("b"),), lambda: None, epoch=2)
    assert rid("b") not in t.caches
    t.put_copy(rid("c"), copied(4), 2)  # from 0, the copy is only cut back: nothing of it used
    cache = t.cache_for(rid("c"), 0, (rid("c"),), lambda: None, epoch=2)
    assert cache is not None and cache.length == 0 and t.own(rid("c"))


def test_copies_make_room_among_copies_only() -> None:
    """A chain node may copy any request ids: its copies evicted the caches this node
    computes with, and wrote into them once gone (a review). They evict older copies,
    and none is taken where only caches of this node's own steps are left."""
    t, now = table(max_caches=2)
    t.cache_for(rid("mine"), 0, (rid("mine"),), lambda: None)
    now[0] += 1
    assert t.room_for_copy(rid("x"))
    t.put_copy(rid("x"), copied(1), 1)
    now[0] += 1
    assert t.room_for_copy(rid("y"))  # x, the least recent copy, goes; mine stays
    t.put_copy(rid("y"), copied(1), 1)
    assert set(t.caches) == {"mine", "y"}
    t.cache_for(rid("y"), 0, (rid("y"),), lambda: None)  # a step made y this node's own
    assert not t.room_for_copy(rid("z")) and set(t.caches) == {"mine", "y"}
