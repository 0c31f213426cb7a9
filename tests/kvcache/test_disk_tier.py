"""DiskTier on real files in tmp_path: round trips, capacity and policies, pins, restart, corruption."""
from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierlm.core.errors import InvalidParameterError
from tierlm.kvcache.tiers.disk import DiskTier


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def value(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


def entry_path(tier: DiskTier, k: bytes):
    return tier.directory / k.hex()[:2] / f"{k.hex()}.kv"


def test_round_trip_and_layout(tmp_path):
    tier = DiskTier(tmp_path / "kv", 10_000)
    assert tier.store([(key(1), value(1)), (key(2), value(2, 50))]) == []
    assert tier.contains([key(1), key(3), key(2)]) == [True, False, True]
    assert tier.load([key(2), key(3), key(1)]) == [value(2, 50), None, value(1)]
    assert entry_path(tier, key(1)).read_bytes() == value(1)
    assert (tier.used_bytes, tier.num_entries) == (150, 2)
    assert (tier.stats.lookups, tier.stats.found, tier.stats.loads, tier.stats.stores) == (3, 2, 2, 2)
    assert not list(tier.directory.glob("*/*.tmp"))
    tier.delete([key(1)])
    assert not entry_path(tier, key(1)).exists()
    assert tier.contains([key(1)]) == [False] and tier.load([key(1)]) == [None]
    assert tier.stats.errors == 0
    tier.check_integrity()


def test_file_deleted_behind_the_tier_is_a_miss(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    tier.store([(key(1), value(1))])
    entry_path(tier, key(1)).unlink()
    assert tier.load([key(1)]) == [None]
    assert tier.num_entries == 0 and tier.stats.errors == 0
    tier.check_integrity()


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_eviction_keeps_the_entry_hit_again(tmp_path, policy):
    tier = DiskTier(tmp_path, 300, policy)
    tier.store([(key(i), value(i)) for i in range(3)])
    assert tier.load([key(0)]) == [value(0)]
    evicted = tier.store([(key(3), value(3))], want_evicted=True)
    assert evicted == [(key(1), value(1))]
    assert tier.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    assert not entry_path(tier, key(1)).exists()
    assert tier.stats.evictions == 1
    tier.check_integrity()


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_pins_survive_eviction(tmp_path, policy):
    tier = DiskTier(tmp_path, 400, policy)
    tier.store([(key(0), value(0))])
    tier.pin([key(0)])
    for i in range(1, 20):
        tier.store([(key(i), value(i))])
        tier.check_integrity()
    assert tier.load([key(0)]) == [value(0)]
    assert tier.stats.evictions == 16
    tier.pin([key(i) for i in range(16, 20)])  # everything pinned: a new store is refused
    tier.store([(key(99), value(99))])
    assert tier.stats.rejected == 1 and tier.contains([key(99)]) == [False]
    tier.check_integrity()


def test_store_larger_than_capacity_is_rejected(tmp_path):
    tier = DiskTier(tmp_path, 100)
    tier.store([(key(1), value(1, 101)), (key(2), value(2, 100))])
    assert tier.stats.rejected == 1 and tier.stats.stores == 1
    assert tier.contains([key(1), key(2)]) == [False, True]
    assert not entry_path(tier, key(1)).exists()
    tier.check_integrity()


def test_capacity_holds_under_varied_sizes(tmp_path):
    tier = DiskTier(tmp_path, 5_000, "s3fifo")
    for i in range(300):
        tier.store([(key(i), value(i, 1 + (i * 37) % 900))])
        if i % 7 == 0:
            tier.load([key(i // 2), key(i // 3)])
        assert tier.used_bytes <= 5_000
    tier.check_integrity()
    on_disk = sum(p.stat().st_size for p in tier.directory.glob("*/*.kv"))
    assert on_disk == tier.used_bytes <= 5_000


@settings(max_examples=50, deadline=None)
@given(policy=st.sampled_from(["lru", "s3fifo"]),
       ops=st.lists(st.tuples(st.sampled_from(["store", "delete", "load", "pin", "unpin"]),
                              st.lists(st.integers(0, 11), min_size=1, max_size=4)), max_size=30))
def test_random_operations_keep_the_tier_consistent(policy, ops):
    size_of = {i: 20 + 37 * i for i in range(12)}  # one value per key, 20..427 bytes, capacity 1000
    with tempfile.TemporaryDirectory() as directory:
        tier = DiskTier(directory, 1000, policy)
        for op, ids in ops:
            keys = [key(i) for i in ids]
            if op == "store":
                tier.store([(key(i), value(i, size_of[i])) for i in ids])
            elif op == "delete":
                tier.delete(keys)
            elif op == "load":
                found = tier.contains(keys)
                loaded = tier.load(keys)
                for i, there, got in zip(ids, found, loaded):
                    assert got == (value(i, size_of[i]) if there else None)
            else:
                getattr(tier, op)(keys)
            tier.check_integrity()
        assert tier.stats.errors == 0
        restarted = DiskTier(directory, 1000, policy)  # a restart finds exactly what is there
        restarted.check_integrity()
        assert set(restarted.index.keys()) == set(tier.index.keys())


def test_restart_finds_the_entries_and_drops_leftovers(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    tier.store([(key(i), value(i, 10 * (i + 1))) for i in range(5)])
    stale = entry_path(tier, key(0)).parent / f".{key(0).hex()}.1234.abcd.tmp"
    stale.write_bytes(b"half an entry")
    (tmp_path / "ab").mkdir(exist_ok=True)
    foreign = [tmp_path / "README", tmp_path / "ab" / "not-a-key.kv", tmp_path / "ab" / f"{key(7).hex()}.kv"]
    for path in foreign:  # the last is a key in the wrong folder: not ours either
        path.write_bytes(b"x")

    restarted = DiskTier(tmp_path, 10_000)
    assert restarted.num_entries == 5 and restarted.used_bytes == 150
    assert restarted.contains([key(i) for i in range(6)]) == [True] * 5 + [False]
    assert restarted.load([key(3)]) == [value(3, 40)]
    assert not stale.exists()
    assert all(path.exists() for path in foreign)
    restarted.check_integrity()


def test_restart_over_capacity_trims_the_oldest(tmp_path):
    tier = DiskTier(tmp_path, 10_000)
    for i in range(10):
        tier.store([(key(i), value(i))])
        os.utime(entry_path(tier, key(i)), ns=(10**18 + i * 10**9,) * 2)  # mtimes in store order, 1 s apart

    restarted = DiskTier(tmp_path, 450)
    assert restarted.contains([key(i) for i in range(10)]) == [False] * 6 + [True] * 4
    assert restarted.used_bytes == 400 and restarted.stats.evictions == 6
    assert len(list(tmp_path.glob("*/*.kv"))) == 4
    restarted.check_integrity()


def test_changed_file_is_returned_as_is(tmp_path):
    """The tier hands back whatever bytes are there; the codec's checks catch corruption."""
    tier = DiskTier(tmp_path, 10_000)
    tier.store([(key(1), value(1)), (key(2), value(2))])
    entry_path(tier, key(1)).write_bytes(value(1)[:40])  # truncated
    flipped = bytearray(value(2))
    flipped[10] ^= 0x01
    entry_path(tier, key(2)).write_bytes(bytes(flipped))
    assert tier.load([key(1), key(2)]) == [value(1)[:40], bytes(flipped)]
    tier.discard_corrupt(key(1))
    assert tier.stats.corrupt == 1 and not entry_path(tier, key(1)).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to any directory")
def test_unwritable_directory_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InvalidParameterError, match="locked.*--disk-cache-dir"):
            DiskTier(locked, 1000)
        with pytest.raises(InvalidParameterError, match="--disk-cache-dir"):
            DiskTier(locked / "sub", 1000)
    finally:
        locked.chmod(0o700)


def test_directory_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InvalidParameterError, match="file/kv.*--disk-cache-dir"):
        DiskTier(tmp_path / "file" / "kv", 1000)
