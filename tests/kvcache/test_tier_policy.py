"""Eviction policies of the lower tiers (kvcache/tiers/policy.py) and the shared tier bookkeeping
(IndexedTier through HostTier): capacity, pins, evicted entries handed down."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierlm.kvcache.tiers.host import HostTier
from tierlm.kvcache.tiers.policy import LRUPolicy, S3FIFOPolicy, make_policy


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


def fill(policy, keys, size=10):
    evicted = []
    for key in keys:
        while policy.used + size > policy.capacity_bytes:
            v = policy.victim(set())
            evicted.append(v)
            policy.remove(v)
        policy.insert(key, size)
    return evicted


def test_lru_evicts_least_recently_used():
    p = LRUPolicy(30)
    fill(p, [k(0), k(1), k(2)])
    p.touch(k(0))
    assert p.victim(set()) == k(1)
    assert p.victim({k(1)}) == k(2)
    assert p.victim({k(0), k(1), k(2)}) is None


def test_s3fifo_keeps_a_hot_entry_through_a_scan_that_lru_loses():
    """One entry hit on every round, then a scan of one-hit entries twice the capacity: S3-FIFO keeps the
    hot entry (it reached main), LRU evicts it as soon as the scan pushes it to the end of the order."""
    for policy, kept in ((S3FIFOPolicy(100), True), (LRUPolicy(100), False)):
        fill(policy, [k(0)])
        for i in range(1, 5):  # some traffic while the hot key is hit
            fill(policy, [k(i)])
            policy.touch(k(0))
        fill(policy, [k(1000 + i) for i in range(20)])  # the scan
        assert (k(0) in policy) is kept, policy.name


def test_s3fifo_ghost_readmits_to_main():
    p = S3FIFOPolicy(100)
    fill(p, [k(i) for i in range(12)])  # k(0), k(1) evicted from small without hits -> ghosts
    assert k(0) not in p
    fill(p, [k(0)])
    assert k(0) in p._main


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["store", "load", "delete", "pin", "unpin"]), st.integers(0, 15),
                              st.integers(1, 40)), max_size=60))
def test_tier_accounting_after_every_operation(name, ops):
    """Random stores (varied sizes), loads, deletes and pins: capacity never exceeded, the index matches the
    stored bytes, a pinned entry is never evicted, what was evicted is handed back exactly once."""
    tier = HostTier(100, name)
    alive: dict[bytes, bytes] = {}
    for op, i, size in ops:
        key = k(i)
        if op == "store":
            value = bytes([i]) * size
            evicted = tier.store([(key, value)], want_evicted=True)
            for ek, ev in evicted:
                assert not tier.is_pinned(ek), "a pinned entry was evicted"
                assert alive.pop(ek) == ev
            if tier.contains([key])[0]:
                alive.setdefault(key, value)
        elif op == "load":
            got = tier.load([key])[0]
            assert got == alive.get(key)
        elif op == "delete":
            tier.delete([key])
            alive.pop(key, None)
        elif op == "pin":
            tier.pin([key])
        else:
            tier.unpin([key])
        tier.check_integrity()
        assert tier.used_bytes == sum(len(v) for v in alive.values()) <= tier.capacity_bytes
        assert set(tier.index.keys()) == set(alive)


def test_store_larger_than_the_tier_or_all_pinned_is_rejected_and_counted():
    tier = HostTier(50)
    assert tier.store([(k(0), b"x" * 51)]) == []
    assert tier.stats.rejected == 1 and tier.num_entries == 0
    tier.store([(k(1), b"a" * 30)])
    tier.pin([k(1)])
    tier.store([(k(2), b"b" * 30)])  # needs k(1)'s room, which is pinned
    assert tier.contains([k(1), k(2)]) == [True, False]
    assert tier.stats.rejected == 2
    tier.check_integrity()


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="use one of lru, s3fifo"):
        make_policy("fifo", 10)
