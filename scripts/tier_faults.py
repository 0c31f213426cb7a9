"""The KV tiers' fault run: requests keep coming while faults are injected into every lower tier, and every
request must finish with exactly the tokens of an engine without tiers.

    .venv/bin/python scripts/tier_faults.py [--faults 1000] [--redis-url URL] [--json out.json]

Engine: default model, a small device pool (so prefixes keep moving down), a disk tier and a Redis tier
(--redis-url, else a local redis-server/valkey-server this script starts, stops and restarts), write-through
so both hold every block (no host tier: memory is not where faults happen). Prompts: a few shared documents
(~200 tokens) plus distinct questions, greedy, 4 new tokens, compared with a tier-less reference engine.
Faults are aimed at the entries the next request will look up (its prefix's block hashes), so each one is
read back, not left to rot unread; drawn at random between requests (seeded):
    disk-flip       one byte flipped in a random disk entry
    disk-truncate   a random disk entry cut short
    disk-foreign    a random disk entry replaced by a well-formed entry of another KV format
    disk-delete     a random disk entry deleted behind the tier's back
    redis-flip      one byte flipped in a random Redis value (SETRANGE)
    redis-truncate  a random Redis value cut short
    redis-restart   the Redis server stopped (requests run while it is down), then started again, empty
Reported: faults by kind, requests, wrong tokens, failed requests, corrupt entries detected per tier, tier
errors, fallbacks to recompute, hits per tier.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from pathlib import Path

from tierlm import LLM, SamplingParams
from tierlm.bench.redis_process import start_local_server
from tierlm.config import TierConfig
from tierlm.kvcache.hashing import hash_request_blocks
from tierlm.kvcache.tiers import EntryIdentity
from tierlm.kvcache.tiers.codec import encode_entry

TEXT = (Path(__file__).parents[1] / "src/tierlm/bench/data/midsummer_act1.txt").read_text().split()
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
KINDS = ("disk-flip", "disk-truncate", "disk-foreign", "disk-delete", "redis-flip", "redis-truncate", "redis-restart")
WEIGHTS = (4, 4, 4, 2, 4, 4, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=1000)
    ap.add_argument("--per-request", type=int, default=4, help="faults injected before each request")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    server = None
    url = a.redis_url
    if url is None:
        server = start_local_server()
        url = server.url
    disk_dir = tempfile.mkdtemp(prefix="tierlm-faults-")
    docs = [" ".join(TEXT[i * 130:(i + 1) * 130]) for i in range(6)]
    questions = [" ".join(TEXT[3000 - j * 7 - 7:3000 - j * 7]) if len(TEXT) > 3000 else f"Question {j}?"
                 for j in range(40)]
    prompts = [d + " " + q for q in questions for d in docs]
    ref_llm = LLM(kv_cache_memory=256 << 20)
    cfg = TierConfig(disk_dir=disk_dir, redis_url=url, redis_timeout_s=0.2, write_policy="write_through",
                     redis_namespace="tierlm:faults:")
    llm = LLM(num_kv_blocks=40, tiers=cfg)
    ctl = llm.engine.tiers
    kv = llm.engine.kv
    disk, redis_tier = ctl.tiers[0], ctl.tiers[1]
    redis_tier.BACKOFF_START_S = 0.05
    client = server.client() if server is not None else None
    identity = ctl.identity
    foreign = EntryIdentity(identity.model, "bf16", identity.layout)
    faults: collections.Counter[str] = collections.Counter()
    requests = wrong = failed = 0
    ref_cache: dict[str, list[int]] = {}
    redis_down_for = 0
    t0 = time.time()

    def inject(kind: str, keys: list[bytes]) -> bool:
        nonlocal redis_down_for
        tokens_of = [ids[j * kv.block_size:(j + 1) * kv.block_size] for j in range(len(keys))]
        if kind.startswith("disk"):
            files = [p for k in keys if (p := disk.directory / k.hex()[:2] / f"{k.hex()}.kv").exists()]
            if not files:
                return False
            path = rng.choice(files)
            raw = path.read_bytes()
            if kind == "disk-flip":
                buf = bytearray(raw)
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                path.write_bytes(bytes(buf))
            elif kind == "disk-truncate":
                path.write_bytes(raw[: rng.randrange(len(raw))])
            elif kind == "disk-foreign":  # well-formed, right key and tokens, another KV format
                i = next(j for j, k in enumerate(keys) if path.name.startswith(k.hex()))
                payload = rng.randbytes(ctl.entry_payload_bytes)
                path.write_bytes(encode_entry(foreign, tokens_of[i], [payload]))
            else:
                path.unlink()
            return True
        if client is None or redis_down_for:
            return False
        if kind == "redis-restart":
            server.stop()
            redis_down_for = 1  # requests while it is down
            return True
        names = [n for k in keys if client.exists(n := b"tierlm:faults:" + k.hex().encode())]
        if not names:
            return False
        key = rng.choice(names)
        n = client.strlen(key)
        if kind == "redis-flip":
            pos = rng.randrange(n)
            byte = client.getrange(key, pos, pos)
            client.setrange(key, pos, bytes([byte[0] ^ (1 << rng.randrange(8))]))
        else:
            client.set(key, client.getrange(key, 0, rng.randrange(n) - 1) if n > 1 else b"")
        return True

    try:
        while sum(faults.values()) < a.faults:
            ctl.flush()
            prompt = rng.choice(prompts)
            ids = llm.tokenizer.encode(prompt)
            keys = hash_request_blocks(ids, kv.block_size, kv.hash_seed, kv.extra_keys)
            for _ in range(a.per_request):
                kind = rng.choices(KINDS, weights=WEIGHTS)[0]
                if inject(kind, keys):
                    faults[kind] += 1
            if prompt not in ref_cache:
                ref_cache[prompt] = ref_llm.generate([prompt], PARAMS)[0].outputs[0].token_ids
            requests += 1
            try:
                out = llm.generate([prompt], PARAMS)[0]
                wrong += out.outputs[0].token_ids != ref_cache[prompt]
            except Exception as e:  # a failed request is a finding, not a crash of the run
                failed += 1
                print(f"request failed: {type(e).__name__}: {e}")
            if redis_down_for:
                redis_down_for -= 1
                if not redis_down_for:
                    server.start()
            if requests % 50 == 0:
                print(f"{requests} requests, {sum(faults.values())} faults, wrong {wrong}, failed {failed}", flush=True)
        ctl.flush()
        llm.engine.kv.pool.check_integrity()  # the tiers' own checks would flag the files damaged on purpose
    finally:
        stats = llm.engine.tier_stats()
        llm.close()
        if server is not None:
            server.stop()
    result = {
        "faults": dict(faults), "faults_total": sum(faults.values()), "requests": requests,
        "wrong_token_requests": wrong, "failed_requests": failed, "seconds": round(time.time() - t0, 1),
        "corrupt_detected": {t: s["corrupt"] for t, s in stats.items()},
        "tier_errors": {t: s["errors"] for t, s in stats.items()},
        "reconnects": {t: s["reconnects"] for t, s in stats.items()},
        "hit_tokens": {t: s["hit_tokens"] for t, s in stats.items()},
        "fallback_tokens": {"corrupt": ctl.stats.fallback_corrupt, "timeout": ctl.stats.fallback_timeout,
                            "cost": ctl.stats.fallback_cost},
    }
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
