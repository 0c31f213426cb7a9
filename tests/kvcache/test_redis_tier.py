"""RedisTier against a real Redis-compatible server (tests/helpers/redis_server.py): round trips, sharing
between processes, capacity and policies, pins, and the server going away and coming back."""
from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest
from helpers.redis_server import RedisServer, find_server_binary, free_port

from tierlm.kvcache.tiers.redis_tier import RedisTier


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def value(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


@pytest.fixture
def tiers():
    """Build tiers with a short backoff, and close them after the test."""
    built: list[RedisTier] = []

    def make(url: str, capacity_bytes: int = 100_000, **kwargs) -> RedisTier:
        tier = RedisTier(url, capacity_bytes, **kwargs)
        tier.BACKOFF_START_S = 0.05
        built.append(tier)
        return tier

    yield make
    for tier in built:
        tier.close()


def server_keys(server: RedisServer) -> set[bytes]:
    client = server.client()
    try:
        return set(client.keys("tierlm:kv:*"))
    finally:
        client.close()


def test_round_trip(redis_server, tiers):
    tier = tiers(redis_server.url)
    assert tier.store([(key(1), value(1)), (key(2), value(2, 50))]) == []
    assert tier.contains([key(1), key(3), key(2)]) == [True, False, True]
    assert tier.load([key(2), key(3), key(1)]) == [value(2, 50), None, value(1)]
    assert server_keys(redis_server) == {b"tierlm:kv:" + key(i).hex().encode() for i in (1, 2)}
    assert (tier.used_bytes, tier.num_entries) == (150, 2)
    assert (tier.stats.lookups, tier.stats.found, tier.stats.loads, tier.stats.stores) == (3, 2, 2, 2)
    tier.delete([key(1)])
    assert tier.contains([key(1)]) == [False] and tier.load([key(1)]) == [None]
    assert tier.contains([]) == [] and tier.load([]) == []
    assert tier.stats.errors == 0 and tier.healthy
    tier.check_integrity()


def test_two_processes_share_the_server(redis_server, tiers):
    writer, reader = tiers(redis_server.url), tiers(redis_server.url)
    writer.store([(key(i), value(i)) for i in range(4)])
    assert reader.num_entries == 0  # the reader's index holds only what it stored itself
    assert reader.contains([key(i) for i in range(5)]) == [True] * 4 + [False]
    assert reader.load([key(3), key(0)]) == [value(3), value(0)]
    assert reader.stats.found == 4 and reader.stats.loads == 2
    other_namespace = tiers(redis_server.url, namespace="other:")
    assert other_namespace.contains([key(0)]) == [False]
    reader.check_integrity()
    writer.check_integrity()


def test_entry_evicted_by_the_server_leaves_the_index_at_load(redis_server, tiers):
    tier = tiers(redis_server.url)
    tier.store([(key(1), value(1)), (key(2), value(2))])
    client = redis_server.client()
    client.flushall()
    client.close()
    assert tier.contains([key(1), key(2)]) == [False, False]
    assert tier.load([key(1), key(2)]) == [None, None]
    assert tier.num_entries == 0 and tier.used_bytes == 0
    tier.check_integrity()


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_eviction_keeps_the_entry_hit_again(redis_server, tiers, policy):
    tier = tiers(redis_server.url, 300, policy=policy)
    tier.store([(key(i), value(i)) for i in range(3)])
    assert tier.load([key(0)]) == [value(0)]
    assert tier.store([(key(3), value(3))], want_evicted=True) == [(key(1), value(1))]
    assert tier.contains([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    assert tier.stats.evictions == 1
    tier.check_integrity()


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_capacity_holds_under_varied_sizes(redis_server, tiers, policy):
    tier = tiers(redis_server.url, 5_000, policy=policy)
    for i in range(200):
        tier.store([(key(i), value(i, 1 + (i * 37) % 900))])
        if i % 7 == 0:
            tier.load([key(i // 2), key(i // 3)])
        assert tier.used_bytes <= 5_000
    tier.check_integrity()
    client = redis_server.client()
    assert sum(client.strlen(name) for name in server_keys(redis_server)) == tier.used_bytes
    client.close()
    assert len(server_keys(redis_server)) == tier.num_entries


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_pins_survive_eviction(redis_server, tiers, policy):
    tier = tiers(redis_server.url, 400, policy=policy)
    tier.store([(key(0), value(0))])
    tier.pin([key(0)])
    for i in range(1, 20):
        tier.store([(key(i), value(i))])
    assert tier.load([key(0)]) == [value(0)]
    assert tier.stats.evictions == 16 and len(server_keys(redis_server)) == 4
    tier.check_integrity()


def test_store_larger_than_capacity_is_rejected(redis_server, tiers):
    tier = tiers(redis_server.url, 100)
    tier.store([(key(1), value(1, 101)), (key(2), value(2, 100))])
    assert tier.stats.rejected == 1 and tier.stats.stores == 1
    assert tier.contains([key(1), key(2)]) == [False, True]
    tier.check_integrity()


def test_server_down_then_back(redis_server, tiers):
    tier = tiers(redis_server.url)
    tier.store([(key(1), value(1))])
    redis_server.stop()

    assert tier.contains([key(1), key(2)]) == [False, False]
    assert not tier.healthy and tier.stats.errors == 1 and "ConnectionError" in tier.last_error
    assert tier.load([key(1)]) == [None]  # down: answered without a round trip
    assert tier.store([(key(2), value(2))]) == [] and tier.stats.rejected == 1
    tier.check_integrity()
    time.sleep(0.06)  # the backoff passed, the server is still down: one more failure, a longer backoff
    assert tier.load([key(1)]) == [None] and tier.stats.errors == 2 and not tier.healthy

    redis_server.start()  # same port, empty (nothing persisted)
    time.sleep(0.15)
    assert tier.healthy
    assert tier.store([(key(2), value(2))]) == []
    assert tier.stats.reconnects == 1 and tier.stats.errors == 2
    assert tier.num_entries == 1  # the reconnect forgot the index (key 1 was lost with the server's memory)
    assert tier.contains([key(1), key(2)]) == [False, True]
    assert tier.load([key(1), key(2)]) == [None, value(2)]
    tier.store([(key(1), value(1))])  # written again, not skipped as "already indexed"
    assert tier.load([key(1)]) == [value(1)]
    tier.check_integrity()


def test_server_that_stops_answering_times_out(redis_server, tiers):
    tier = tiers(redis_server.url, timeout_s=0.2)
    tier.store([(key(1), value(1))])
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert tier.load([key(1)]) == [None]
        assert time.monotonic() - t0 < 1.0
        assert not tier.healthy and "Timeout" in tier.last_error
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    time.sleep(0.06)
    assert tier.load([key(1)]) == [value(1)] and tier.stats.reconnects == 1


def test_no_server_never_raises(tiers):
    tier = tiers(f"redis://127.0.0.1:{free_port()}/0")
    assert tier.contains([key(1)]) == [False]
    assert tier.load([key(1)]) == [None]
    time.sleep(0.06)
    assert tier.store([(key(1), value(1))]) == []
    assert tier.stats.errors == 2 and tier.stats.rejected == 1 and not tier.healthy
    assert tier.num_entries == 0
    tier.check_integrity()


def test_server_out_of_memory_is_an_error_not_an_outage(tmp_path, tiers):
    binary = find_server_binary()
    if binary is None:
        pytest.skip("no Redis-compatible server binary")
    with RedisServer(binary, tmp_path / "small", maxmemory="4mb") as server:
        tier = tiers(server.url, 100 << 20)
        tier.store([(key(i), value(i, 1 << 20)) for i in range(8)])
        assert 0 < tier.stats.stores < 8 and tier.stats.errors == 8 - tier.stats.stores
        assert tier.stats.rejected == tier.stats.errors and "OutOfMemoryError" in tier.last_error
        assert tier.healthy  # the server answers: only the write failed
        assert tier.contains([key(0)]) == [True]
        tier.check_integrity()
