"""Which unit should a lower KV tier store: one block, or a chunk of blocks contiguous across layers?
Stores and loads the same bytes through each tier (host, disk, Redis) in units of 1, 4 and 16 blocks of the
default model (fp32: 16 tokens x 46,080 B = 737,280 B a block) and prints GB/s each way, plus the cost of a
lookup (`contains`) over the units of one 4K-token prompt.

    .venv/bin/python scripts/tier_unit.py [--mib 256] [--redis-url URL] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tierlm.bench.redis_process import start_local_server
from tierlm.kvcache.tiers.disk import DiskTier
from tierlm.kvcache.tiers.host import HostTier
from tierlm.kvcache.tiers.redis_tier import RedisTier

BLOCK = 16 * 46_080


def measure(tier, unit_blocks: int, total: int) -> dict:
    size = unit_blocks * BLOCK
    n = max(1, total // size)
    value = os.urandom(size)
    keys = [i.to_bytes(8, "little") + os.urandom(24) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, 8):  # the controller hands stores over in batches
        tier.store([(k, value) for k in keys[i:i + 8]])
    store_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = tier.load(keys)
    load_s = time.perf_counter() - t0
    assert all(v is not None and len(v) == size for v in got), f"{tier.name}: lost entries"
    lookup_keys = keys[: max(1, 4096 // (16 * unit_blocks))]
    t0 = time.perf_counter()
    for _ in range(20):
        tier.contains(lookup_keys)
    lookup_s = (time.perf_counter() - t0) / 20
    tier.delete(keys)
    return {"unit_blocks": unit_blocks, "entries": n, "store_gb_s": n * size / store_s / 1e9,
            "load_gb_s": n * size / load_s / 1e9, "lookup_4k_prompt_ms": lookup_s * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    total = a.mib << 20
    server = None
    url = a.redis_url
    if url is None:
        server = start_local_server()
        url = server.url
    rows = []
    try:
        for make in (lambda: HostTier(4 * total), lambda: DiskTier(tempfile.mkdtemp(prefix="tierlm-disk-"), 4 * total),
                     lambda: RedisTier(url, 4 * total, timeout_s=10.0)):
            tier = make()
            for unit in (1, 4, 16):
                row = {"tier": tier.name, **measure(tier, unit, total)}
                rows.append(row)
                print(f"{row['tier']:5s} unit {unit:2d} blocks: store {row['store_gb_s']:.2f} GB/s, "
                      f"load {row['load_gb_s']:.2f} GB/s, lookup of a 4K prompt {row['lookup_4k_prompt_ms']:.3f} ms",
                      flush=True)
            tier.close()
    finally:
        if server is not None:
            server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
