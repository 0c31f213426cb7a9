"""Time to first token of a long prompt whose KV is somewhere below the device pool, against recomputing it:
the per-tier TTFT targets of the KV-tier work. Default model, one process, sides alternating rep by rep.

    .venv/bin/python scripts/tier_ttft.py [--context 2048 4096 8000] [--reps 3] [--redis-url URL]
                                          [--cold-disk] [--json out.json]

Sides (each an engine with prefix caching and the engine's default 512-token chunked prefill):
    recompute  device pool only: the prefix cache is reset before each rep, so the prompt is recomputed
    host       + a host-memory tier
    disk       + a disk tier (a fresh temporary directory)
    redis      + a Redis tier (--redis-url, else a local redis-server/valkey-server started here)
Every tier side stores blocks with write-through; a rep first runs the prompt once (untimed) so its blocks
are in the tier, flushes queued writes, resets the device prefix cache (the KV now lives only below the
device), then times add_request -> first token of the same prompt plus a fresh 16-token question, so at
least one block is computed. --cold-disk evicts the disk tier's files from the OS page cache first
(posix_fadvise DONTNEED), so disk loads read the device, not memory. Each rep also diffs the greedy tokens
(8) against the recompute side: a faster wrong answer is a bug.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tierlm import LLM, SamplingParams
from tierlm.bench.redis_process import start_local_server
from tierlm.config import TierConfig

TEXT = (Path(__file__).parents[1] / "src/tierlm/bench/data/midsummer_act1.txt").read_text()
FIRST = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
CHECK = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def prompt_ids(llm: LLM, n: int) -> list[int]:
    ids = llm.tokenizer.encode(TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def time_to_first_token(llm: LLM, ids: list[int]) -> tuple[float, dict]:
    eng = llm.engine
    t0 = time.perf_counter()
    rid = eng.add_request(ids, FIRST)
    while True:
        for out in eng.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                dt = time.perf_counter() - t0
                while eng.has_unfinished_requests():
                    eng.step()
                return dt, out.cached_tokens_by_tier


def drop_page_cache(directory: str) -> None:
    for path in Path(directory).glob("*/*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 4096, 8000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--cold-disk", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    server = None
    redis_url = a.redis_url
    if redis_url is None:
        server = start_local_server()
        redis_url = server.url
    disk_dir = tempfile.mkdtemp(prefix="tierlm-disk-")
    blocks = (max(a.context) + 64) // 16 + 16
    big = 4 << 30
    sides = {
        "recompute": TierConfig(),
        "host": TierConfig(host_memory_bytes=big, write_policy="write_through"),
        "disk": TierConfig(disk_dir=disk_dir, disk_bytes=big, write_policy="write_through"),
        "redis": TierConfig(redis_url=redis_url, redis_bytes=big, write_policy="write_through",
                            redis_namespace=f"tierlm:ttft:{os.getpid()}:", redis_timeout_s=5.0),
    }
    llms = {name: LLM(num_kv_blocks=max(blocks, 512), tiers=cfg) for name, cfg in sides.items()}
    warm = prompt_ids(llms["recompute"], 64)
    for llm in llms.values():
        llm.generate([warm], CHECK)
    rows = []
    try:
        for n in a.context:
            base = prompt_ids(llms["recompute"], n - 16)
            times: dict[str, list[float]] = {name: [] for name in llms}
            cached: dict[str, dict] = {}
            mismatches = 0
            for rep in range(a.reps):
                question = [(rep * 16 + i) % 2000 + 100 for i in range(16)]
                ids = base + question
                ref = llms["recompute"].generate([ids], CHECK)[0].outputs[0].token_ids
                for name, llm in llms.items():
                    eng = llm.engine
                    eng.kv.reset_prefix_cache()
                    if eng.tiers is not None:
                        eng.tiers.clear()
                        llm.generate([base], CHECK)  # computes the prefix: write-through puts its blocks in the tier
                        eng.tiers.flush()
                        if name == "disk" and a.cold_disk:
                            drop_page_cache(disk_dir)
                    eng.kv.reset_prefix_cache()
                    dt, by_tier = time_to_first_token(llm, ids)
                    times[name].append(dt)
                    cached[name] = by_tier
                    eng.kv.reset_prefix_cache()
                    if eng.tiers is not None:
                        got = llm.generate([ids], CHECK)[0].outputs[0].token_ids
                        mismatches += got != ref
            med = {name: statistics.median(v) for name, v in times.items()}
            row = {"context": n, "ttft_s": med, "ttft_all_s": times, "cached_tokens_by_tier": cached,
                   "speedup_vs_recompute": {k: med["recompute"] / v for k, v in med.items()},
                   "greedy_mismatches": mismatches}
            rows.append(row)
            print(f"context {n}: " + ", ".join(
                f"{k} {v * 1e3:.0f} ms ({med['recompute'] / v:.1f}x)" for k, v in med.items())
                + f"; cached {cached}; greedy mismatches {mismatches}", flush=True)
    finally:
        for llm in llms.values():
            llm.close()
        if server is not None:
            server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "cold_disk": a.cold_disk}, indent=1))


if __name__ == "__main__":
    main()
