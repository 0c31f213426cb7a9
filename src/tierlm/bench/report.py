"""The Markdown report: headline table per workload, peer ratios, correctness gate, per-run detail,
plots and the definitions behind every number. Flagged configs are marked red (HTML span, which
renders in most viewers) and with a text marker that survives where colour does not.
"""
from __future__ import annotations

from pathlib import Path

from tierlm.bench.headline import (
    GATE_HEAD,
    MEMORY_HEAD,
    PEER_HEAD,
    SPEED_HEAD,
    fmt_bytes,
    fmt_num,
    fmt_pct,
    gate_rows,
    memory_sections,
    peer_rows,
    speed_sections,
    tier_head,
    tier_sections,
)
from tierlm.bench.results import BenchResult

DEFINITIONS = """\
- **TTFT** first token - send (scheduled arrival in open loop); **E2E** done - send;
  **TPOT** (E2E - TTFT) / (output tokens - 1), per request: it includes time spent waiting behind other
  requests' prefills; **ITL** gaps between consecutive tokens of a request.
- **decode tok/s** (in-process runs): decode tokens / seconds of engine steps that held only decodes, the
  speed of decode compute; **prefill tok/s (steps)** the same for prefill-only steps; steps holding both
  (chunked prefill next to decodes) are counted apart, and the share of step time they took is listed per run.
  For HTTP runs, decode tok/s is the wall-clock rate: output tokens after the first / time during which some
  request was decoding (union of intervals).
- **x columns** compare a run with its reference run on the same workload and load: the baseline for
  in-process configurations, `tierlm serve` (same HTTP driver) for HTTP peers. TTFT x, TPOT x, e2e x =
  reference p50 / config p50; decode x = config decode tok/s / reference. In brackets: the min and max of
  the per-repetition ratios (rep i against rep i; configurations run minutes apart, so this is spread
  across repetitions, not a paired noise bound).
- **KV B/token** from the KV format (kvcache/spec.py); **KV/session**: KV bytes referenced by running requests
  / running sessions at the run's peak (blocks shared through the prefix cache count once); **peak KV**:
  KV bytes referenced at that peak; **KV pool**: allocated; **max sessions**: KVSpec.max_sessions(budget,
  longest session of the workload, shared prefix if the config caches prefixes), the same definition
  `tierlm info` uses; **activations**: peak bytes torch allocated during one profiled engine step of the
  run's largest step size (beyond weights and KV); **weights**: every parameter and buffer resident;
  **peak RSS**: the whole process's resident peak during the run, reset per run (marked "(process)" where
  the kernel does not allow the reset and the figure is the process's lifetime peak).
- **hit rate**: cached prompt tokens / prompt tokens over completed requests, counted once per request (the
  same for tierlm and for servers reporting usage.prompt_tokens_details.cached_tokens). Per tier (KV tiers
  table): the cached prompt tokens that came from the device pool, host memory, disk or Redis
  (RequestOutput.cached_tokens_by_tier) / prompt tokens; the tiers' rates add up to the hit rate.
- **KV tiers** (configs with lower tiers): **loaded/stored** bytes each tier handed back to the device pool /
  took in during the run (the tiers' own counters; queued disk/Redis writes are flushed at the end of each
  repetition, so they count); **fallback tok**: prompt tokens found in a tier but recomputed, because the
  cost model said recompute was faster (cost), the load missed --tier-load-timeout (timeout) or an entry
  was corrupt or gone or the tier failed (corrupt); **loads**: load jobs, of which async = larger than
  --tier-load-budget, run while other requests decoded (the rest a step waited for), and the most requests
  loading at once; **ITL p99 during loads**: the p99 of the inter-token latencies of tokens made in engine
  steps during which a load was in flight (started or waited for in the step, or loading before or after
  it), next to the run's overall ITL p99; n/a when no step had a load. Every engine gets its own disk
  directory and Redis namespace, and the tiers are cleared with the prefix cache before every repetition.
- **GB/s**: (steps x weight bytes a step reads + the KV its attention read, each step's scheduled context x
  KV bytes/token) / wall time, a model of the bytes moved (not a hardware counter), against the machine's
  measured copy bandwidth. **$/1M** output tokens from --usd-per-hour.
- **tokens vs ref**: greedy output tokens of every request of the run against the baseline's for the same
  requests; the **gate** runs its own prompt set (chat prompts, long prompts chunked across many steps, shared
  prefixes, a pool tight enough to preempt and evict, then passages that evict every earlier prefix and the
  long prompts again, loaded back from the lower tiers of a tiered config, which runs its gate with them: the
  gate table counts what each config's run exercised, incl. the tokens loaded from each tier) and compares
  with the baseline and with transformers (gating in fp32, advisory otherwise).
- Percentiles pool the requests of every repetition; throughputs pool tokens over the summed wall time.
  Requests are greedy with EOS ignored, so every configuration generates the same token counts; the prefix
  cache is reset before every repetition.
"""


def _md_table(head, rows) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _red(text: str) -> str:
    return f'<span style="color:red">**{text}**</span>'


DETAIL_HEAD = ("config", "workload", "arrivals", "TTFT ms p50/90/99", "TPOT ms", "ITL ms", "ITL ms during loads",
               "E2E ms", "req/s",
               "out tok/s", "total tok/s", "prefill tok/s (steps)", "mixed-step time", "goodput", "evictions",
               "preemptions", "GB/s", "$/1M out", "out tok/s spread")


def _detail_rows(result: BenchResult) -> list[list[str]]:
    rows = []
    for r in result.runs:
        m = r.metrics

        def d(dist, digits=0):
            return "/".join(fmt_num(getattr(dist, q), digits) for q in ("p50", "p90", "p99"))

        rows.append([r.config, r.workload, r.arrival, d(m.ttft_ms), d(m.tpot_ms, 1), d(m.itl_ms, 1),
                     d(m.itl_during_loads_ms, 1) if m.itl_during_loads_samples else "n/a", d(m.e2e_ms),
                     fmt_num(m.requests_per_s, 2), fmt_num(m.output_tok_per_s), fmt_num(m.total_tok_per_s),
                     fmt_num(r.steps.prefill_tok_per_s if r.steps else None),
                     fmt_pct(r.steps.mixed_fraction if r.steps else None), fmt_pct(m.goodput_fraction),
                     fmt_num(r.evictions, 0), fmt_num(r.preemptions, 0), fmt_num(r.achieved_gb_s, 2),
                     fmt_num(m.usd_per_million_tokens, 3), fmt_pct(r.spread["output_tok_per_s"].rel_spread)])
    return rows


def render_markdown(result: BenchResult, plots: list[Path], plot_note: str | None) -> str:
    env = result.environment
    mach = env.machine
    out = ["# tierlm bench report", ""]
    if result.incomplete:
        out += [_red(f"INCOMPLETE: stopped during {result.stopped_during}; the numbers below are partial."), ""]
    out += [f"Command: `{result.command}`", "",
            f"Model {env.model} (context {env.context}), device {mach.get('device')}, "
            f"{mach.get('cpu_count')} CPUs / {mach.get('torch_threads')} threads, "
            f"measured copy bandwidth {fmt_num(mach.get('bandwidth_gb_s'))} GB/s, seed {env.seed}, "
            f"config digest `{env.config_digest}`.", ""]
    out += ["## Headline: each configuration against its reference", ""]
    for w, rows in speed_sections(result):
        out += [f"**{w.name}**: {w.shape}, shared prefix {w.shared_prefix_tokens} tokens (`{w.spec}`)", ""]
        out += _md_table(SPEED_HEAD, [[_red(c) for c in cells] if flagged else cells for cells, flagged in rows])
        out.append("")
    out += ["## Memory: KV, activations and weights", ""]
    for w, rows in memory_sections(result):
        out += [f"**{w.name}**", ""] + _md_table(MEMORY_HEAD, rows) + [""]
    tiers = tier_sections(result)
    if tiers:
        out += ["## KV tiers: hit rate, bytes moved and latency while loading", ""]
        env_t = env.tiers
        if env_t:
            where = [f"host memory {fmt_bytes(env_t.get('host_memory_bytes'))}" if env_t.get("host_memory_bytes") else "",
                     f"disk `{env_t.get('disk_dir')}` ({fmt_bytes(env_t.get('disk_bytes'))}, temporary)"
                     if env_t.get("disk_dir") else "",
                     f"Redis {env_t.get('redis_url')} ({env_t.get('redis_server')}, namespace "
                     f"`{env_t.get('redis_namespace')}`)" if env_t.get("redis_url") else ""]
            out += ["Tiers: " + "; ".join(x for x in where if x) + f"; write policy {env_t.get('write_policy')}, "
                    f"load budget {fmt_bytes(env_t.get('load_step_budget_bytes'))} per step.", ""]
        for w, rows in tiers:
            out += [f"**{w.name}** (`{w.spec}`)", ""]
            out += _md_table(tier_head(result), [[_red(c) for c in cells] if flagged else cells
                                                 for cells, flagged in rows])
            out.append("")
    pr = peer_rows(result)
    if pr:
        out += [f"## Peer: transformers {result.peers.transformers_version or ''} generate() on the same model and dtype",
                "", "The tierlm baseline engine and transformers alternate repetition by repetition.", ""]
        out += _md_table(PEER_HEAD, pr) + [""]
    out += ["## Correctness gate", "",
            "Greedy tokens of each configuration on the gate set (chat prompts; long prompts cut from a shipped "
            "public-domain text, chunked across many steps; shared prefixes hit across waves; a pool small enough "
            "to preempt and evict; passages that push every earlier prefix off the device, then the long prompts "
            "again, which a tiered configuration loads back from its tiers), against the baseline and against "
            "transformers. A lossy configuration (FP8 KV) is gated in drift mode instead: the baseline's greedy "
            "gate replies teacher-forced through its gate engine must meet `tierlm drift`'s thresholds (top-1 "
            "agreement >= 0.99, KL mean <= 0.01 and p99 <= 0.1 nats, passkey accuracy >= the baseline's); its "
            "exact diff is shown but advisory.", ""]
    out += _md_table(GATE_HEAD, [[_red(c) for c in cells] if flagged else cells for cells, flagged in gate_rows(result)])
    out += ["", "## Every run", ""]
    out += _md_table(DETAIL_HEAD, _detail_rows(result))
    out += ["", "## Configurations", ""]
    out += _md_table(("config", "what it is", "attention", "KV bytes/token", "KV pool", "lower KV tiers", "weights",
                      "step token budget", "load s"),
                     [[c.name, c.summary, c.attention_backend, f"{c.kv_bytes_per_token:,}", fmt_bytes(c.kv_pool_bytes),
                       ", ".join(f"{t} {fmt_bytes(n)}" for t, n in c.lower_tiers.items()) or "none",
                       fmt_bytes(c.weights_bytes), c.max_num_batched_tokens, fmt_num(c.load_s, 1)]
                      for c in result.configs])
    out += ["", "## Plots", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots] or [plot_note or "no plots"]
    if result.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    out += ["", "## Definitions", "", DEFINITIONS]
    return "\n".join(out)


def write_report(result: BenchResult, out_dir: Path, plots: list[Path], plot_note: str | None) -> Path:
    path = out_dir / "report.md"
    path.write_text(render_markdown(result, plots, plot_note))
    return path
