"""The headline tables, as rows of cells shared by the terminal rendering (here, red for flagged configs when
the terminal takes colour) and the Markdown report:

    speed   per workload: each run's latencies and throughputs, and its ratios against its reference run
            (the baseline; `tierlm serve` for HTTP peers), with the per-repetition range of each ratio
    memory  per workload: KV (bytes/token, per session, peak in use, pool), max sessions at the budget,
            activations, weights and the process's peak RSS
    tiers   per workload, when a config ran with lower KV tiers: TTFT p50/p99, ITL p99 overall and while
            tier loads were in flight, throughput, hit rate per tier, bytes each tier loaded and stored,
            fallbacks to recompute, loads, and tokens against the reference
    gate    per configuration: greedy tokens against the baseline and against transformers
    peer    tierlm vs transformers phase speeds (prefill, decode, e2e) with stated shapes
"""
from __future__ import annotations

from tierlm.bench.comparison import reference_of
from tierlm.bench.results import TIERS, BenchResult, Comparison, Ratio, RunResult

RED, BOLD, RESET = "\033[31m", "\033[1m", "\033[0m"

SPEED_HEAD = ("config", "load", "TTFT p50", "TPOT p50", "decode tok/s", "out tok/s", "TTFT x", "TPOT x", "decode x",
              "e2e x", "hit rate", "tokens vs ref")
MEMORY_HEAD = ("config", "load", "KV B/token", "KV/session", "peak KV", "KV pool", "max sessions", "activations",
               "weights", "peak RSS")
GATE_HEAD = ("config", "vs baseline", "vs transformers", "gate engine", "status")
PEER_HEAD = ("phase", "shape", "tierlm tok/s", "transformers tok/s", "tierlm / transformers (per-rep range)")


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_ratio(r: Ratio | None) -> str:
    """'1.58x (1.41-1.70)': the pooled ratio and the range of the per-repetition ratios."""
    if r is None or r.value is None:
        return "n/a"
    if r.lo is None or r.hi is None or r.lo == r.hi:
        return fmt_x(r.value)
    return f"{r.value:.2f}x ({r.lo:.2f}-{r.hi:.2f})"


def fmt_pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def fmt_num(v, digits: int = 1, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


def _check_cell(run: RunResult) -> tuple[str, bool]:
    c = run.check
    if run.driver == "http":
        return "not gated (text API)", False
    if c is None:
        return ("reference" if reference_of(run) is None else "no reference run"), False
    cell = f"{c.exact_match}/{c.requests} exact"
    if c.flagged:
        return cell + f" FLAGGED@{c.first_divergence}", True
    return cell, False


def speed_sections(result: BenchResult) -> list[tuple[object, list[tuple[list[str], bool]]]]:
    """[(workload, [(cells, flagged), ...])]; a run's gate flags it too."""
    comps: dict[tuple, Comparison] = {(c.config, c.workload_spec, c.arrival): c for c in result.comparisons}
    flagged_configs = set(result.flagged_configs())
    sections = []
    for w in result.workloads:
        rows = []
        for r in (r for r in result.runs if r.workload_spec == w.spec):
            c = comps.get((r.config, r.workload_spec, r.arrival))
            m = r.metrics
            decode = r.steps.decode_tok_per_s if r.steps else m.decode_tok_per_s_wall
            check, flagged = _check_cell(r)
            hit = total_hit_rate(r)
            ref_mark = None
            if c is None:  # the reference run itself, or a run whose reference did not run (n/a)
                ref_mark = "1.00x" if reference_of(r) is None else "n/a"
            rows.append(([r.config + (" (incomplete)" if r.incomplete else ""), r.load_label,
                          fmt_num(m.ttft_ms.p50, 0, " ms"), fmt_num(m.tpot_ms.p50, 1, " ms"), fmt_num(decode),
                          fmt_num(m.output_tok_per_s), ref_mark or fmt_ratio(c.ttft_x), ref_mark or fmt_ratio(c.tpot_x),
                          ref_mark or fmt_ratio(c.decode_x), ref_mark or fmt_ratio(c.e2e_x), fmt_pct(hit), check],
                         flagged or r.config in flagged_configs))
        sections.append((w, rows))
    return sections


def total_hit_rate(run: RunResult) -> float | None:
    """Cached prompt tokens from any tier / prompt tokens (None where no tier reported a rate)."""
    rates = [v for v in run.cache_hit_rate.values() if v is not None]
    return sum(rates) if rates else None


def lower_tiers_used(result: BenchResult) -> list[str]:
    """The lower KV tiers (host, disk, redis) some run of the result had."""
    used = {t for r in result.runs for t in TIERS[1:] if r.cache_hit_rate.get(t) is not None}
    used |= {t for r in result.runs if r.tiers is not None for t in r.tiers.bytes_loaded}
    return [t for t in TIERS[1:] if t in used]


def tier_head(result: BenchResult) -> tuple[str, ...]:
    lower = lower_tiers_used(result)
    return ("config", "load", "TTFT p50/p99", "ITL p99", "ITL p99 during loads", "out tok/s",
            *(f"hit {t}" for t in ("device", *lower)), *(f"{t} loaded/stored" for t in lower),
            "fallback tok (cost/timeout/corrupt)", "loads (async, max in flight)", "tokens vs ref")


def tier_sections(result: BenchResult) -> list[tuple[object, list[tuple[list[str], bool]]]]:
    """[(workload, [(cells, flagged), ...])] for the KV tier table (tier_head's columns); empty unless some
    run had lower tiers. Every run of the workload is listed, so tiered configs sit next to the others."""
    lower = lower_tiers_used(result)
    if not any(r.tiers is not None for r in result.runs):
        return []
    flagged_configs = set(result.flagged_configs())
    sections = []
    for w in result.workloads:
        rows = []
        for r in (r for r in result.runs if r.workload_spec == w.spec):
            m, t = r.metrics, r.tiers
            check, flagged = _check_cell(r)
            during = m.itl_during_loads_ms.p99
            moved = [f"{fmt_bytes(t.bytes_loaded.get(x))} / {fmt_bytes(t.bytes_stored.get(x))}"
                     if t is not None and x in t.bytes_loaded else "n/a" for x in lower]
            rows.append(([r.config + (" (incomplete)" if r.incomplete else ""), r.load_label,
                          f"{fmt_num(m.ttft_ms.p50, 0)}/{fmt_num(m.ttft_ms.p99, 0)} ms", fmt_num(m.itl_ms.p99, 1, " ms"),
                          "n/a" if during is None else f"{during:,.1f} ms ({m.itl_during_loads_samples} ITLs)",
                          fmt_num(m.output_tok_per_s),
                          *(fmt_pct(r.cache_hit_rate.get(x)) for x in ("device", *lower)), *moved,
                          (f"{t.fallback_cost_tokens}/{t.fallback_timeout_tokens}/{t.fallback_corrupt_tokens}"
                           if t is not None else "n/a"),
                          (f"{t.load_jobs} ({t.async_loads} async, max {t.max_loads_in_flight})"
                           if t is not None else "n/a"), check],
                         flagged or r.config in flagged_configs))
        sections.append((w, rows))
    return sections


def memory_sections(result: BenchResult) -> list[tuple[object, list[list[str]]]]:
    sections = []
    for w in result.workloads:
        rows = []
        for r in (r for r in result.runs if r.workload_spec == w.spec and r.driver == "in-process"):
            mem = r.memory
            rows.append([r.config, r.load_label, fmt_num(mem.kv_bytes_per_token, 0), fmt_bytes(mem.kv_bytes_per_session),
                         fmt_bytes(mem.peak_kv_bytes), fmt_bytes(mem.kv_pool_bytes),
                         fmt_num(mem.max_sessions_at_budget, 0), fmt_bytes(mem.activations_peak_bytes),
                         fmt_bytes(mem.weights_bytes),
                         fmt_bytes(mem.peak_rss_bytes) + (" (process)" if mem.peak_rss_scope == "process" else "")])
        if rows:
            sections.append((w, rows))
    return sections


def _gate_cell(g) -> str:
    if g is None:
        return "n/a"
    cell = f"{g.exact_match}/{g.prompts} exact"
    return cell + (f", first divergence {g.first_divergence}" if g.first_divergence is not None else "")


def gate_rows(result: BenchResult) -> list[tuple[list[str], bool]]:
    rows = []
    for g in result.gates:
        e = g.engine
        engine = (f"{e.get('num_blocks')} blocks, {e.get('max_num_batched_tokens')} tok/step, "
                  f"{e.get('preemptions')} preemptions, {e.get('evictions')} evictions, "
                  f"{e.get('prefix_hit_tokens')} hit tokens") if e else "n/a"
        if e and e.get("tier_hit_tokens") is not None:
            engine += ", loaded " + ", ".join(f"{t} {n}" for t, n in e["tier_hit_tokens"].items()) + " tokens"
            if e.get("offloads"):
                engine += f", {e['offloads']} offloads"
        vs_ref = "reference" if g.vs_reference is None and g.config == "baseline" else _gate_cell(g.vs_reference)
        if g.lossy is not None:
            lg = g.lossy
            vs_ref = (f"lossy gate: top-1 {lg.top1_agreement:.3f}, KL mean {lg.kl_mean:.4f} / p99 {lg.kl_p99:.3f} "
                      f"over {lg.positions} positions, "
                      + (f"passkey@{lg.needle_length} {lg.needle_candidate:.2f} (baseline {lg.needle_reference:.2f})"
                         if lg.needle_length else "passkey n/a (pool too small)")
                      + f"; exact diff (advisory): {vs_ref}")
        vs_tf = _gate_cell(g.vs_transformers) + (" (advisory: not fp32)" if g.transformers_advisory else "")
        rows.append(([g.config, vs_ref, vs_tf, engine,
                      f"FLAGGED: {g.reason}" if g.flagged else "ok"], g.flagged))
    return rows


def peer_rows(result: BenchResult) -> list[list[str]]:
    out = []
    for row in result.peers.phases:
        tps = row.tok_per_s
        rng = f" ({row.ratio_range[0]:.2f}-{row.ratio_range[1]:.2f})" if row.ratio_range else ""
        out.append([row.phase, row.shape, fmt_num(tps.get("tierlm")), fmt_num(tps.get("transformers")),
                    fmt_x(row.ratio) + (rng if row.ratio is not None else "")])
    return out


def _table(head, rows, flags=None, color=False) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(head, widths))]
    for i, row in enumerate(rows):
        line = "  ".join(f"{c:<{w}}" if j < 2 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(row, widths)))
        if flags and flags[i] and color:
            line = f"{RED}{BOLD}{line}{RESET}"
        lines.append(line)
    return lines


def render_text(result: BenchResult, color: bool = False) -> str:
    env = result.environment
    mach = env.machine
    out = []
    if result.incomplete:
        msg = f"INCOMPLETE: stopped during {result.stopped_during}; partial results below"
        out.append(f"{RED}{BOLD}{msg}{RESET}" if color else msg)
    out.append(f"tierlm bench: {env.model or '?'} on {mach.get('device', '?')} ({mach.get('cpu_count', '?')} CPUs, "
               f"{mach.get('torch_threads', '?')} threads, copy bandwidth {fmt_num(mach.get('bandwidth_gb_s'))} GB/s), "
               f"seed {env.seed}, {env.plan.get('reps', '?')} rep(s){', quick' if env.plan.get('quick') else ''}")
    for w, rows in speed_sections(result):
        out += ["", f"workload {w.name}: {w.shape} (shared prefix {w.shared_prefix_tokens} tokens)"]
        out += _table(SPEED_HEAD, [r for r, _ in rows], [f for _, f in rows], color)
    for w, rows in memory_sections(result):
        out += ["", f"memory, {w.name}:"]
        out += _table(MEMORY_HEAD, rows)
    for w, rows in tier_sections(result):
        out += ["", f"KV tiers, {w.name}:"]
        out += _table(tier_head(result), [r for r, _ in rows], [f for _, f in rows], color)
    pr = peer_rows(result)
    if pr:
        out += ["", f"peer: transformers {result.peers.transformers_version or ''} generate() vs the tierlm baseline "
                    "engine, same model and dtype, alternating rep by rep"]
        out += _table(PEER_HEAD, pr)
    if result.gates:
        out += ["", "correctness gate (greedy tokens on the gate set: chat prompts, long prompts chunked, "
                    "shared prefixes, preemption, eviction, prefixes loaded back from the KV tiers):"]
        rows = gate_rows(result)
        out += _table(GATE_HEAD, [r for r, _ in rows], [f for _, f in rows], color)
    for note in result.notes:
        out.append(f"note: {note}")
    out += ["", "x columns: config vs its reference run (baseline; tierlm serve for HTTP peers), pooled over reps; "
                "in brackets the min and max of the rep-i-vs-rep-i ratios (runs of different configs are minutes "
                "apart, so this shows spread, not a noise bound). TTFT/TPOT/e2e x = reference p50 / config p50; "
                "decode x = decode tok/s of decode-only steps (wall-clock decode rate for HTTP), config / reference."]
    return "\n".join(out)
