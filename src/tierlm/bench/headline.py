"""The headline table: per workload (shape stated), each config's memory and speed against the baseline,
plus the transformers peer's phase ratios and the correctness gate. Rendered as terminal text (red
for flagged configs when the terminal takes colour) and as Markdown rows for the report.
"""
from __future__ import annotations

RED, GREEN, BOLD, RESET = "\033[31m", "\033[32m", "\033[1m", "\033[0m"

HEAD = ("config", "arrivals", "KV/session", "mem saved", "prefill x", "decode x", "e2e x",
        "TTFT p50", "TPOT p50", "out tok/s", "gate")


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def fmt_num(v, digits: int = 1, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


def gate_cell(gate: dict | None) -> tuple[str, bool]:
    """('6/6 ok' or '4/6 DIVERGED@3', flagged)."""
    if not gate or not gate.get("prompts"):
        return "not gated", False
    if gate.get("flagged"):
        at = gate.get("first_divergence")
        return f"{gate['exact_match']}/{gate['prompts']} FLAGGED" + (f"@{at}" if at is not None else ""), True
    return f"{gate['exact_match']}/{gate['prompts']} ok", False


def workload_sections(result) -> list[tuple[dict, list[tuple[list[str], bool]]]]:
    """[(workload info, [(cells, flagged), ...])] with the baseline first in each section."""
    comps = {(c["config"], c["workload_spec"], c["arrival"]): c for c in result.get("comparisons", [])}
    sections = []
    for w in result.get("workloads", []):
        rows = []
        for r in result.get("runs", []):
            if r["workload_spec"] != w["spec"]:
                continue
            m = r["metrics"]
            c = comps.get((r["config"], r["workload_spec"], r["arrival"]))
            is_base = r["config"] == "baseline"
            sp = c["speedup"] if c else {}
            gate, flagged = gate_cell(r.get("correctness"))
            load = f"{r['rate']:g}/s" if r.get("rate") is not None else f"c={r['concurrency']}"
            if r.get("timed"):
                load = f"trace, c<={r['concurrency']}" if r.get("concurrency") else "trace"
            cells = [r["config"] + (" (incomplete)" if r.get("incomplete") else ""), load,
                     fmt_bytes(m.get("kv_bytes_per_session")),
                     "-" if is_base else fmt_pct(c["memory_reduction"] if c else None),
                     "1.00x" if is_base else fmt_x(sp.get("prefill")),
                     "1.00x" if is_base else fmt_x(sp.get("decode")),
                     "1.00x" if is_base else fmt_x(sp.get("e2e")),
                     fmt_num(m["ttft_ms"].get("p50"), 0, " ms"), fmt_num(m["tpot_ms"].get("p50"), 1, " ms"),
                     fmt_num(m.get("output_tok_per_s"), 1), gate]
            rows.append((cells, flagged))
        sections.append((w, rows))
    return sections


def peer_rows(result) -> list[list[str]]:
    t = result.get("peers", {}).get("transformers", {})
    return [[r["phase"], r["shape"], fmt_num(r["tierlm_tok_per_s"]), fmt_num(r["peer_tok_per_s"]), fmt_x(r["ratio"])]
            for r in t.get("ratios", [])]


PEER_HEAD = ("phase", "shape", "tierlm tok/s", "transformers tok/s", "tierlm / transformers")


def _table(head, rows, flags=None, color=False) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(head, widths))]
    for i, row in enumerate(rows):
        line = "  ".join(f"{c:<{w}}" if j < 2 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(row, widths)))
        if flags and flags[i] and color:
            line = f"{RED}{BOLD}{line}{RESET}"
        lines.append(line)
    return lines


def render_text(result: dict, color: bool = False) -> str:
    env = result.get("environment", {})
    mach = env.get("machine", {})
    plan = env.get("plan", {})
    out = []
    if result.get("incomplete"):
        msg = f"INCOMPLETE: stopped during {result.get('stopped_during')}; partial results below"
        out.append(f"{RED}{BOLD}{msg}{RESET}" if color else msg)
    out.append(f"tierlm bench: {env.get('model', '?')} on {mach.get('device', '?')} "
               f"({mach.get('cpu_count', '?')} CPUs, {mach.get('torch_threads', '?')} threads, "
               f"copy bandwidth {fmt_num(mach.get('bandwidth_gb_s'))} GB/s), seed {env.get('seed')}, "
               f"{plan.get('reps', '?')} rep(s){', quick' if plan.get('quick') else ''}")
    for w, rows in workload_sections(result):
        out.append("")
        out.append(f"workload {w['name']}: {w['shape']}")
        out.extend(_table(HEAD, [r for r, _ in rows], [f for _, f in rows], color))
    pr = peer_rows(result)
    if pr:
        t = result["peers"]["transformers"]
        out.append("")
        out.append(f"peer: transformers {t.get('version', '')} generate() vs tierlm baseline, same model and dtype")
        out.extend(_table(PEER_HEAD, pr))
        g = t.get("gate")
        if g:
            out.append(f"transformers greedy tokens vs baseline: {g['exact_match']}/{g['prompts']} exact "
                       f"(first divergence {g['first_divergence']}; informational)")
    out.append("")
    out.append("correctness gate (greedy tokens vs baseline on the fixed prompt set):")
    for g in result.get("correctness", []):
        line = (f"  {g['config']:<16} {g['exact_match']}/{g['prompts']} exact, first divergence "
                f"{g['first_divergence']}, repeat anomalies {g['repeat_anomalies']}: {g['reason']}")
        if g["flagged"]:
            line = f"{line}  FLAGGED"
            line = f"{RED}{BOLD}{line}{RESET}" if color else line
        out.append(line)
    for note in result.get("notes", []):
        out.append(f"note: {note}")
    out.append("")
    out.append("mem saved: 1 - KV bytes per running session vs baseline (shared prefix blocks count once); "
               "speed-ups: baseline / config of TTFT p50 (prefill), TPOT p50 (decode), E2E p50 (e2e)")
    return "\n".join(out)
