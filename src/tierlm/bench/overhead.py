"""Server overhead: output tok/s through `tierlm serve` (HTTP, streaming) vs the in-process engine, same run.

    python -m tierlm.bench.overhead [--concurrency 1 8] [--requests-per-slot 2] [--max-tokens 64] [--reps 2]
                                    [--json PATH] [engine flags: --model, --dtype, --device, --kv-cache-memory ...]

Definitions: output tok/s = output tokens / wall time of one run (`metrics.summarize`);
overhead = 1 - server tok/s / in-process tok/s, the median of the per-rep ratios (min-max alongside).

Algorithm, at each concurrency C: max(4, C x requests-per-slot) seeded text prompts, tokenized as the server
tokenizes them (and checked to survive decode + encode, since the HTTP driver sends text), each asking for
--max-tokens greedy tokens with EOS ignored, so both sides generate the same tokens. Both sides run the same
requests closed loop at concurrency C (`arrivals.ArrivalPlan`): in process through the bench's engine driver
(`engine_driver.run_engine` on an LLMEngine built from the engine flags), and over HTTP through the bench's
HTTP driver (`http_driver.HttpDriver`) against `tierlm serve` started with the same engine flags
(`server_process.ServerProcess`). One untimed warm-up each, then the sides alternate rep by rep. Prefix
caching is off on both sides, so every rep recomputes its prompts. The greedy texts must match (the
in-process token ids decoded vs the streamed chunks joined); a mismatch is reported, never hidden.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

from tierlm.args import add_engine_args, engine_config
from tierlm.bench.arrivals import ArrivalPlan
from tierlm.bench.http_driver import HttpDriver, HttpRun
from tierlm.bench.metrics import summarize
from tierlm.bench.workloads import BenchRequest, Workload
from tierlm.core.errors import TierlmError

WORDS = ("memory cache block tier prefix token stream model engine latency bandwidth kernel batch "
         "page disk host device chunk hash request server client queue").split()


@dataclass
class OverheadRow:
    concurrency: int
    requests: int
    max_tokens: int
    engine_tok_s: float  # median over reps, in process
    server_tok_s: float  # median over reps, through the server
    overhead: float  # 1 - median of the per-rep server / in-process ratios
    overhead_range: tuple[float, float]  # min, max of the per-rep overheads
    engine_tok_s_reps: list[float]
    server_tok_s_reps: list[float]
    ttft_p50_ms: dict[str, float | None]  # "engine" / "server", over every rep's requests
    tpot_p50_ms: dict[str, float | None]
    texts_differ: int  # requests whose greedy text differs between the sides (any rep)
    greedy_match: bool


def overhead_workload(tokenizer, n: int, max_tokens: int, seed: int = 0, words: int = 40) -> Workload:
    """n distinct seeded text prompts as BenchRequests, tokenized as the server tokenizes a text prompt.
    TierlmError if a prompt does not survive decode + encode (the HTTP side would send other tokens)."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        text = f"Request {i}. Write a paragraph about " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        ids = tokenizer.encode(text)
        if tokenizer.encode(tokenizer.decode(ids)) != ids:
            raise TierlmError(f"prompt {i} does not survive decode + encode with this tokenizer, so the server "
                              "would see other tokens", "use a model whose tokenizer round-trips plain text")
        requests.append(BenchRequest(ids, max_tokens, tag=f"o{i}"))
    return Workload("overhead", f"overhead:n={n},words={words},osl={max_tokens},seed={seed}",
                    f"{n} requests x ~{words}-word prompt / {max_tokens} out tokens", requests)


def measure_overhead(engine, url: str, concurrencies: list[int], max_tokens: int, reps: int = 2,
                     requests_per_slot: int = 2, progress: Callable[[OverheadRow], None] | None = None
                     ) -> list[OverheadRow]:
    """One OverheadRow per concurrency (the module docstring's algorithm). `engine`: the in-process
    LLMEngine; `url`: a `tierlm serve` running the same engine flags."""
    from tierlm.bench.engine_driver import run_engine

    tokenizer = engine.tokenizer

    def in_process(requests, plan):
        run = run_engine(engine, requests, plan)
        records = sorted(run.records, key=lambda r: r.index)
        # The server streams its incremental detokenizer's text, which holds back an incomplete UTF-8 tail.
        return run, [tokenizer.decode(r.token_ids or []).rstrip("\ufffd") for r in records]

    def server(requests, plan):
        run = HttpDriver(url, tokenizer).run(requests, plan, HttpRun())
        failed = [r.error for r in run.records if r.error]
        if failed or not run.complete:
            raise TierlmError(f"{len(failed)} of {len(requests)} requests to {url} failed (first: "
                              f"{failed[0] if failed else 'run incomplete'})", "see the server's log")
        return run, [r.text for r in sorted(run.records, key=lambda r: r.index)]

    rows = []
    for c in concurrencies:
        reqs = overhead_workload(tokenizer, max(4, c * requests_per_slot), max_tokens, seed=c).requests
        plan = ArrivalPlan(concurrency=c)
        in_process(reqs[:c], plan)  # warm-up
        server(reqs[:c], plan)
        runs: dict[str, list] = {"engine": [], "server": []}
        differ: set[int] = set()
        for _ in range(reps):
            run, ref = in_process(reqs, plan)
            runs["engine"].append(run)
            run, texts = server(reqs, plan)
            runs["server"].append(run)
            differ |= {i for i, (x, y) in enumerate(zip(texts, ref)) if x != y}
        tok_s = {k: [summarize(r.records, r.wall_s).output_tok_per_s or 0.0 for r in v] for k, v in runs.items()}
        pooled = {k: summarize([rec for r in v for rec in r.records], sum(r.wall_s for r in v))
                  for k, v in runs.items()}
        ratios = [s / e for e, s in zip(tok_s["engine"], tok_s["server"]) if e > 0]
        if not ratios:
            raise TierlmError(f"concurrency {c}: the in-process runs produced no tokens", "raise --max-tokens")
        row = OverheadRow(
            concurrency=c, requests=len(reqs), max_tokens=max_tokens,
            engine_tok_s=statistics.median(tok_s["engine"]), server_tok_s=statistics.median(tok_s["server"]),
            overhead=1 - statistics.median(ratios), overhead_range=(1 - max(ratios), 1 - min(ratios)),
            engine_tok_s_reps=tok_s["engine"], server_tok_s_reps=tok_s["server"],
            ttft_p50_ms={k: m.ttft_ms.p50 for k, m in pooled.items()},
            tpot_p50_ms={k: m.tpot_ms.p50 for k, m in pooled.items()},
            texts_differ=len(differ), greedy_match=not differ)
        if differ:
            print(f"warning: concurrency {c}: {len(differ)}/{len(reqs)} greedy texts differ between the server "
                  "and the in-process engine", file=sys.stderr)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_row(r: OverheadRow) -> str:
    ms = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
    return (f"concurrency {r.concurrency:>3}: in-process {r.engine_tok_s:7.1f} tok/s   server (HTTP, streaming) "
            f"{r.server_tok_s:7.1f} tok/s   overhead {100 * r.overhead:5.1f}% "
            f"({100 * r.overhead_range[0]:.1f}% to {100 * r.overhead_range[1]:.1f}%)   TTFT p50 "
            f"{ms(r.ttft_p50_ms['engine'])} / {ms(r.ttft_p50_ms['server'])} ms   "
            f"greedy texts {'match' if r.greedy_match else f'DIFFER ({r.texts_differ}/{r.requests})'}")


def engine_flags(actions: list[argparse.Action], args: argparse.Namespace) -> list[str]:
    """The command-line flags that give `tierlm serve` the engine `args` describes (every set value)."""
    out = []
    for act in actions:
        value = getattr(args, act.dest)
        if isinstance(act, argparse._StoreTrueAction):
            out += [act.option_strings[0]] if value else []
        elif isinstance(act, argparse._AppendAction):
            for item in value or ():
                out += [act.option_strings[0], str(item)]
        elif value is not None:
            out += [act.option_strings[0], str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierlm.bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per concurrency slot (at least 4 in all)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    before = set(p._actions)
    add_engine_args(p)
    engine_actions = [act for act in p._actions if act not in before]
    p.set_defaults(kv_cache_memory=1 << 30)
    a = p.parse_args(argv)
    if min(a.concurrency) < 1 or a.requests_per_slot < 1 or a.reps < 1 or a.max_tokens < 2:
        p.error("--concurrency, --requests-per-slot and --reps take values >= 1, --max-tokens >= 2")
    a.no_prefix_caching = True  # both sides: every rep recomputes its prompts

    from tierlm.bench.server_process import ServerProcess
    from tierlm.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(engine_config(a))
        with ServerProcess(engine_flags(engine_actions, a)) as srv:
            rows = measure_overhead(engine, srv.url, a.concurrency, a.max_tokens, a.reps, a.requests_per_slot,
                                    progress=lambda r: print(format_row(r), flush=True))
    except TierlmError as e:
        print(f"tierlm.bench.overhead: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
