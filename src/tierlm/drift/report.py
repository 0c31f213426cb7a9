"""What a drift run shows: the human table, the JSON document and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from tierlm.drift.thresholds import Check


def _num(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if pct:
        return f"{100 * v:+.3g}%"
    if v == 0:
        return "0"
    return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def table_rows(results: dict, checks: list[Check]) -> list[tuple[str, str, str, str, str]]:
    """(metric, reference, candidate, threshold, status) rows."""
    by = {c.metric: c for c in checks}
    rows = []

    def row(label, ref, cand, metric=None, threshold=None, pct=False):
        c = by.get(metric) if metric else None
        rows.append((label, _num(ref, pct), _num(cand, pct),
                     threshold or (c.threshold_text if c else ""), c.status if c else ""))

    h = results["held_out"]
    if h:
        row(f"top-1 agreement ({h['positions']} positions)", 1.0, h["top1_agreement"], "top1_agreement")
        if "top1_agreement_decisive" in h:
            row(f"  where the reference leads by >= {h['decisive_margin']:g} nat ({100 * h['decisive_share']:.0f}%)",
                1.0, h["top1_agreement_decisive"], "top1_agreement_decisive")
        row("KL(ref||cand) mean, nats", 0.0, h["kl"]["mean"], "kl_mean")
        row("KL p99", 0.0, h["kl"]["p99"], "kl_p99")
        row("KL max", 0.0, h["kl"]["max"], "kl_max")
        ppl = h["perplexity"]
        row("perplexity (continuations)", ppl["reference"], ppl["candidate"])
        c = by.get("ppl_delta")
        row("perplexity delta", 0.0, ppl["delta"], "ppl_delta", pct=True,
            threshold=None if c is None or c.limit is None else f"|d| <= {100 * c.limit:g}%")
    g = results["greedy"]
    if g:
        row(f"greedy exact match ({g['prompts']} prompts)", 1.0, g["exact_match"], "greedy_exact_match")
    if g and g["diverged"]:
        row("greedy first divergence mean / min", "-",
            f"{g['first_divergence_mean']:.1f} / {g['first_divergence_min']}")
    for length, n in results["needle"].items():
        c = by.get(f"needle_drop@{length}")
        thr = "" if c is None else ("advisory" if c.limit is None else
                                    ">= reference" if c.limit == 0 else f">= reference - {c.limit:g}")
        row(f"needle accuracy @{length} ({n['needles']} keys)", n["reference_accuracy"], n["candidate_accuracy"],
            f"needle_drop@{length}", threshold=thr)
    s = results["safety"]
    if s:
        row(f"safety decision agreement c=1 ({s['prompts']} prompts)", 1.0, s["agreement"], "safety_agreement")
        row(f"safety decision agreement c={s['load_concurrency']}", s["reference_agreement_under_load"],
            s["agreement_under_load"], "safety_agreement_under_load")
        hr = s["harmful_refused"]
        row(f"harmful prompts refused (of {s['harmful_prompts']})", hr["reference"], hr["candidate"])
    kv = results["kv_error"]
    if kv is None and h:
        rows.append(("K/V rel. RMS error, worst layer", "-", "n/a", "", "n/a"))
    elif kv is not None:
        row("K/V rel. RMS error, worst layer K / V", "-", f"{_num(kv['max_k'])} / {_num(kv['max_v'])}", "kv_rel_rms")
    gold = results.get("golden")
    if gold:
        row(f"golden exact match ({gold['prompts']} prompts)", "-", gold["exact_match"], "golden_exact_match")
        row("golden max |logprob delta|", "-", gold["max_logprob_delta"], "golden_logprob_delta")
    return rows


def format_table(rows) -> str:
    head = ("metric", "reference", "candidate", "threshold", "status")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    line = lambda r: "  ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(5)).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


def binned(values: list[float], bins: int = 8) -> list[float]:
    """Means of `bins` consecutive, near-equal slices of `values` (fewer when there are fewer values)."""
    n = len(values)
    bins = min(bins, n)
    edges = [round(i * n / bins) for i in range(bins + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]


def summary_lines(doc: dict) -> list[str]:
    res = doc["results"]
    lines = []
    h = res["held_out"]
    if h:
        bins = binned(h["kl_by_position"])
        lines.append(f"KL by continuation position ({len(h['kl_by_position'])} positions in {len(bins)} bins, mean over "
                     f"{h['passages']} passages): " + " ".join(_num(b) for b in bins))
    kv = res["kv_error"]
    if kv is not None:
        worst = sorted(range(len(kv["k"])), key=lambda i: -max(kv["k"][i], kv["v"][i]))[:3]
        lines.append(f"K/V rel. RMS error by layer ({kv['tokens']} tokens): worst layers "
                     + ", ".join(f"{i} (K {_num(kv['k'][i])}, V {_num(kv['v'][i])})" for i in worst))
    gold = res.get("golden")
    if gold and not gold["same_config"]:
        lines.append(f"golden file recorded config {gold['recorded_config']!r}, this run's candidate is "
                     f"{doc['candidate']['config']!r}")
    return lines


def display(side: dict) -> str:
    """A side's CONFIG string, with what "auto" resolved to: 'fp8_e4m3', 'auto (fp32, cpu backend)'."""
    resolved = f"{side['resolved_kv_format']}, {side['resolved_attention_backend']} backend"
    return f"{side['config']} ({resolved})"


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, default=str))


def write_png(path: str | Path, doc: dict) -> None:
    """KL by position (mean and max over passages) and, when measurable, the per-layer K/V error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    h, kv = res["held_out"], res["kv_error"]
    panels = (1 if h else 0) + (1 if kv is not None else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(6 * max(panels, 1), 4), squeeze=False)
    axes = list(axes[0])
    title = f"{display(doc['candidate'])} vs {display(doc['reference'])}"
    if h:
        ax = axes.pop(0)
        x = list(range(len(h["kl_by_position"])))
        ax.plot(x, h["kl_by_position"], label="mean over passages")
        ax.plot(x, h["kl_by_position_max"], alpha=0.5, label="max over passages")
        ax.set_xlabel("continuation position")
        ax.set_ylabel("KL(reference || candidate), nats")
        ax.set_title("KL by continuation position")
        ax.legend()
    if kv is not None:
        ax = axes.pop(0)
        x = list(range(len(kv["k"])))
        ax.plot(x, kv["k"], marker="o", label="K")
        ax.plot(x, kv["v"], marker="s", label="V")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative RMS error")
        ax.set_title("K/V quantization error by layer")
        ax.legend()
    if not panels:
        axes[0].text(0.5, 0.5, "no held-out text measured", ha="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
