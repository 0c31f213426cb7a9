"""Server overhead: output tok/s through HTTP (streaming) vs the in-process engine, same prompts, same run.

    python -m tierlm.server.overhead_bench [--concurrency 1 8] [--max-tokens 64] [--reps 2] [--json PATH]

Both sides run a closed loop at each concurrency C (C requests in flight; a new one starts when one
ends) over the same seeded prompts with greedy decoding and ignore_eos, so every request generates
exactly --max-tokens tokens. The in-process side drives LLMEngine.add_request/step directly. The
server side starts `python -m tierlm.server` on a loopback port as a subprocess with the same engine
flags and streams /v1/completions over httpx. Sides alternate per repetition (after one warm-up
each), the best repetition counts, and the greedy texts of the two sides must match.
overhead = 1 - server tok/s / in-process tok/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

WORDS = ("memory cache block tier prefix token stream model engine latency bandwidth kernel batch "
         "page disk host device chunk hash request server client queue").split()


def make_prompts(n: int, seed: int = 0, words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}. Write a paragraph about " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."
            for i in range(n)]


# ---- in-process --------------------------------------------------------------------------------
def run_inprocess(engine, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, list[str]]:
    from tierlm.core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pending = list(enumerate(prompts))
    active: dict[str, int] = {}
    texts: dict[int, str] = {}
    tokens = 0
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            i, p = pending.pop(0)
            active[engine.add_request(p, params)] = i
        for out in engine.step():
            if out.finished:
                texts[active.pop(out.request_id)] = out.outputs[0].text
                tokens += len(out.outputs[0].token_ids)
    return tokens / (time.perf_counter() - t0), [texts[i] for i in range(len(prompts))]


# ---- through the server ------------------------------------------------------------------------
async def _http_run(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, list[str]]:
    import httpx

    texts: list[str] = [""] * len(prompts)
    counts = [0] * len(prompts)
    queue = list(enumerate(prompts))

    async def worker(client):
        while queue:
            i, p = queue.pop(0)
            body = {"model": "default", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"server answered {r.status_code}: {await r.aread()}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("choices"):
                        texts[i] += ev["choices"][0]["text"]
                    if ev.get("usage"):
                        counts[i] = ev["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        dt = time.perf_counter() - t0
    return sum(counts) / dt, texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_flags: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "tierlm.server", "--host", "127.0.0.1", "--port", str(port), "--log-level",
           "warning", "--timeout", "0", *engine_flags]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise RuntimeError("the server did not become healthy in 180 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierlm.server.overhead_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per concurrency slot (min 4 total)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)

    from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig
    from tierlm.engine.llm_engine import LLMEngine
    from tierlm.args import parse_bytes

    flags = ["--kv-cache-memory", a.kv_cache_memory, "--max-num-seqs", str(a.max_num_seqs)]
    if a.model:
        flags += ["--model", a.model]
    # No prefix caching on either side: every repetition recomputes its prompts.
    cache = CacheConfig(memory_bytes=parse_bytes(a.kv_cache_memory), enable_prefix_caching=False)
    engine = LLMEngine(EngineConfig(model=a.model, cache=cache, scheduler=SchedulerConfig(max_num_seqs=a.max_num_seqs)))
    flags.append("--no-prefix-caching")
    proc, url = start_server(flags)
    results = []
    try:
        for c in a.concurrency:
            prompts = make_prompts(max(4, c * a.requests_per_slot), seed=c)
            run_inprocess(engine, prompts[:c], a.max_tokens, c)  # warm-up
            asyncio.run(_http_run(url, prompts[:c], a.max_tokens, c))
            local, remote = [], []
            for _ in range(a.reps):
                tps, ref_texts = run_inprocess(engine, prompts, a.max_tokens, c)
                local.append(tps)
                tps, texts = asyncio.run(_http_run(url, prompts, a.max_tokens, c))
                remote.append(tps)
                if texts != ref_texts:
                    diff = sum(x != y for x, y in zip(texts, ref_texts))
                    print(f"warning: {diff}/{len(texts)} greedy texts differ between server and engine", file=sys.stderr)
            r = {"concurrency": c, "requests": len(prompts), "max_tokens": a.max_tokens,
                 "engine_tok_s": max(local), "server_tok_s": max(remote),
                 "engine_tok_s_all": local, "server_tok_s_all": remote,
                 "overhead": 1 - max(remote) / max(local), "greedy_match": texts == ref_texts}
            results.append(r)
            print(f"concurrency {c:>3}: engine {r['engine_tok_s']:7.1f} tok/s   server (HTTP, streaming) "
                  f"{r['server_tok_s']:7.1f} tok/s   overhead {100 * r['overhead']:5.1f}%   "
                  f"greedy match {r['greedy_match']}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
