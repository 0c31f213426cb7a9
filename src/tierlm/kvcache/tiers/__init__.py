"""KV tiers below the device pool: host memory (T1), a local disk directory (T2), a Redis-compatible
server (T3), behind one batched interface (base.py), with the entry format (codec.py), eviction policies
(policy.py) and the controller that moves blocks between them (controller.py)."""
from __future__ import annotations

from tierlm.config import TierConfig
from tierlm.kvcache.tiers.base import IndexedTier, Tier, TierStats, TierUnavailable
from tierlm.kvcache.tiers.codec import CorruptEntry, EntryIdentity
from tierlm.kvcache.tiers.controller import BlockRef, LoadJob, LowerHit, TierController
from tierlm.kvcache.tiers.host import HostTier


def build_tiers(config: TierConfig) -> list[Tier]:
    """The configured tiers in lookup order: host, disk, redis (each only when configured)."""
    tiers: list[Tier] = []
    if config.host_memory_bytes:
        tiers.append(HostTier(config.host_memory_bytes, config.eviction_policy))
    if config.disk_dir:
        from tierlm.kvcache.tiers.disk import DiskTier

        tiers.append(DiskTier(config.disk_dir, config.disk_bytes, config.eviction_policy))
    if config.redis_url:
        from tierlm.kvcache.tiers.redis_tier import RedisTier

        tiers.append(RedisTier(config.redis_url, config.redis_bytes, config.eviction_policy, config.redis_timeout_s,
                               config.redis_namespace))
    return tiers


__all__ = ["BlockRef", "CorruptEntry", "EntryIdentity", "HostTier", "IndexedTier", "LoadJob", "LowerHit", "Tier",
           "TierController", "TierStats", "TierUnavailable", "build_tiers"]
