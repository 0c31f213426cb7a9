"""The Markdown report: headline table per workload, peer ratios, correctness gate, per-run detail,
plots and the definitions behind every number. Flagged configs are marked red (HTML span, which
renders in most viewers) and with a text marker that survives where colour does not.
"""
from __future__ import annotations

from pathlib import Path

from tierlm.bench.headline import HEAD, PEER_HEAD, fmt_bytes, fmt_num, fmt_pct, peer_rows, workload_sections

DEFINITIONS = """\
- **TTFT** first token - send (scheduled arrival in open loop); **E2E** done - send;
  **TPOT** (E2E - TTFT) / (output tokens - 1); **ITL** gaps between consecutive tokens of a request.
- **prefill tok/s**: input tokens / time during which some request waited for its first token;
  **decode tok/s**: output tokens after the first / time during which some request was decoding (union of
  intervals, so overlap counts once); **e2e**: output tok/s over the wall time.
- **KV/session**: KV bytes referenced by running requests / running sessions, at the run's peak (blocks
  shared through the prefix cache count once); **mem saved** = 1 - KV/session(config) / KV/session(baseline);
  **max sessions** = memory budget / KV/session.
- **speed-ups** are ratios of per-request medians against the baseline on the same workload and load:
  prefill x = TTFT p50, decode x = TPOT p50, e2e x = E2E p50 (baseline / config). Throughput ratios are in
  the JSON (`comparisons[].throughput_ratio`).
- **hit rate** per tier from counter deltas over the run (device = prefix-cache hit tokens / queried tokens;
  n/a where the tier or the cache is absent). **GB/s**: (steps x weight bytes + context KV read) / wall time,
  against the machine's measured copy bandwidth. **$/1M** output tokens from --usd-per-hour.
- Percentiles pool the requests of every repetition; throughputs pool tokens over the summed wall time;
  the spread column is (max - min) / median of output tok/s across repetitions (n/a with one).
- **peak RSS** is the whole process's resident peak during the run (model, KV pool, Python), reset per run.
- Requests are greedy with EOS ignored, so every configuration generates the same token counts; the prefix
  cache is reset before every repetition.
"""


def _md_table(head, rows) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _red(text: str) -> str:
    return f'<span style="color:red">**{text}**</span>'


def _detail_rows(result: dict) -> list[list[str]]:
    rows = []
    for r in result.get("runs", []):
        m = r["metrics"]
        hit = m.get("cache_hit_rate") or {}
        hits = ", ".join(f"{t} {fmt_pct(v)}" for t, v in hit.items() if v is not None) or "n/a"
        d = lambda k: "/".join(fmt_num(m[k].get(q), 0 if k != "tpot_ms" else 1) for q in ("p50", "p90", "p99"))  # noqa: E731
        rows.append([
            r["config"], r["workload"], r["arrival"], d("ttft_ms"), d("tpot_ms"), d("itl_ms"), d("e2e_ms"),
            fmt_num(m.get("requests_per_s"), 2), fmt_num(m.get("output_tok_per_s")), fmt_num(m.get("total_tok_per_s")),
            fmt_num(m.get("prefill_tok_per_s")), fmt_num(m.get("decode_tok_per_s")),
            fmt_pct(m.get("goodput_fraction")), fmt_bytes(m.get("peak_kv_bytes")), fmt_bytes(m.get("peak_rss_bytes")),
            fmt_num(m.get("max_sessions_at_budget"), 0), hits, fmt_num(m.get("achieved_gb_s"), 2),
            fmt_num(m.get("usd_per_million_tokens"), 3), fmt_pct((r.get("spread") or {}).get("output_tok_per_s", {})
                                                                 .get("rel_spread")),
        ])
    return rows


DETAIL_HEAD = ("config", "workload", "arrivals", "TTFT ms p50/90/99", "TPOT ms", "ITL ms", "E2E ms", "req/s",
               "out tok/s", "total tok/s", "prefill tok/s", "decode tok/s", "goodput", "peak KV", "peak RSS",
               "max sessions", "hit rate", "GB/s", "$/1M out", "spread")


def render_markdown(result: dict, plots: list[Path], plot_note: str | None) -> str:
    env = result.get("environment", {})
    mach = env.get("machine", {})
    out = ["# tierlm bench report", ""]
    if result.get("incomplete"):
        out += [_red(f"INCOMPLETE: stopped during {result.get('stopped_during')}; the numbers below are partial."), ""]
    out += [f"Command: `{result.get('command', '')}`", "",
            f"Model {env.get('model')} (context {env.get('context')}), device {mach.get('device')}, "
            f"{mach.get('cpu_count')} CPUs / {mach.get('torch_threads')} threads, "
            f"measured copy bandwidth {fmt_num(mach.get('bandwidth_gb_s'))} GB/s, seed {env.get('seed')}, "
            f"config digest `{env.get('config_digest')}`.", ""]
    out += ["## Headline: each configuration against the baseline", ""]
    for w, rows in workload_sections(result):
        out += [f"**{w['name']}**: {w['shape']} (`{w['spec']}`)", ""]
        out += _md_table(HEAD, [[_red(c) if flagged else c for c in cells] if flagged else cells
                                for cells, flagged in rows])
        out.append("")
    pr = peer_rows(result)
    if pr:
        t = result["peers"]["transformers"]
        out += [f"## Peer: transformers {t.get('version', '')} generate() on the same model and dtype", ""]
        out += _md_table(PEER_HEAD, pr)
        g = t.get("gate")
        if g:
            out += ["", f"transformers greedy tokens vs baseline: {g['exact_match']}/{g['prompts']} exact "
                        f"(first divergence {g['first_divergence']}; informational, not gated)."]
        out.append("")
    out += ["## Correctness gate", "",
            "Greedy tokens of each configuration against the baseline on the fixed prompt set.", ""]
    gate_rows = []
    for g in result.get("correctness", []):
        status = _red(f"FLAGGED: {g['reason']}") if g["flagged"] else "ok"
        gate_rows.append([g["config"], f"{g['exact_match']}/{g['prompts']}", g["first_divergence"],
                          g["repeat_anomalies"], g["tolerance"], status])
    out += _md_table(("config", "exact match", "first divergence", "repeat anomalies", "tolerance", "status"),
                     gate_rows)
    out += ["", "## Every run", ""]
    out += _md_table(DETAIL_HEAD, _detail_rows(result))
    out += ["", "## Configurations", ""]
    out += _md_table(("config", "what it is", "KV bytes/token", "KV pool", "step token budget", "load s"),
                     [[c["name"], c["summary"], f"{c['kv_bytes_per_token']:,}", fmt_bytes(c["kv_pool_bytes"]),
                       c["max_num_batched_tokens"], fmt_num(c["load_s"], 1)] for c in result.get("configs", [])])
    out += ["", "## Plots", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots] or [plot_note or "no plots"]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    out += ["", "## Definitions", "", DEFINITIONS]
    return "\n".join(out)


def write_report(result: dict, out_dir: Path, plots: list[Path], plot_note: str | None) -> Path:
    path = out_dir / "report.md"
    path.write_text(render_markdown(result, plots, plot_note))
    return path
