"""Holds: entries a load is about to read are not evicted by stores in between (the load's own fresh blocks
displace device blocks whose demotion stores into the same tier), and are evictable again once released.
Counted, so two overlapping loads of one entry both keep it."""
from __future__ import annotations

import hashlib

import pytest

from tierlm.kvcache.tiers.disk import DiskTier
from tierlm.kvcache.tiers.host import HostTier


def _entries(prefix: str, n: int, size: int = 100) -> list[tuple[bytes, bytes]]:
    """Keys shaped like block hashes (32 bytes), as the disk tier names its files."""
    return [(hashlib.sha256(f"{prefix}{i}".encode()).digest(), bytes([i % 256]) * size) for i in range(n)]


@pytest.fixture(params=["host", "disk"])
def tier(request, tmp_path):
    return HostTier(500) if request.param == "host" else DiskTier(tmp_path / "kv", 500)


def test_held_entries_survive_stores_that_would_evict_them(tier):
    old = _entries("old", 5)  # fills the tier: 5 x 100 bytes
    tier.store(old)
    held = [k for k, _ in old[:2]]
    tier.hold(held)
    tier.hold(held[:1])  # a second load of the same first entry
    tier.store(_entries("new", 5))  # room for new entries comes from the unheld three only
    assert tier.contains(held) == [True, True]
    assert tier.contains([k for k, _ in old[2:]]) == [False, False, False]
    assert tier.load(held) == [v for _, v in old[:2]]
    tier.release(held)
    tier.store(_entries("newer", 5))  # old1 is free again; old0 is still held once
    assert tier.contains(held) == [True, False]
    tier.release(held[:1])
    tier.store(_entries("last", 5))
    assert tier.contains(held) == [False, False]
    tier.check_integrity()
