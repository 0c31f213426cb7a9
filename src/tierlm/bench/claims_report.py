"""What `tierlm bench --claims` writes: the per-cell and per-metric tables, the drift rows, OUT/claims.md (its
Definitions section is bench/claims.py's docstring), a heatmap PNG per metric, and --json."""
from __future__ import annotations

import json
from pathlib import Path

from tierlm.bench import claims
from tierlm.bench.claims import MEMORY_CLAIM, MEMORY_METRICS, SPEED_CLAIM, SPEED_METRICS, ClaimsPlan, ClaimsResult


def tables(result: ClaimsResult) -> str:
    """Markdown: one grid per metric (rows context, columns concurrency), then the drift rows and verdicts."""
    cells = result.cells
    ctxs = sorted({c.context for c in cells})
    concs = sorted({c.concurrency for c in cells})
    at = {(c.context, c.concurrency): c for c in cells}
    out = []
    for kind, metrics in (("memory reduction (1 - v4 / reference)", MEMORY_METRICS),
                          ("speed-up (v4 / reference)", SPEED_METRICS)):
        for m in metrics:
            out.append(f"**{m} {kind}**\n")
            out.append("| context | " + " | ".join(f"c={n}" for n in concs) + " |")
            out.append("|---|" + "---|" * len(concs))
            for ctx in ctxs:
                row = []
                for n in concs:
                    c = at.get((ctx, n))
                    v = None if c is None else (c.memory_reduction[m] if m in MEMORY_METRICS else c.speedup[m])
                    row.append("-" if v is None else (f"{v:.0%}" if m in MEMORY_METRICS else f"{v:.2f}x"))
                out.append(f"| {ctx} | " + " | ".join(row) + " |")
            out.append("")
    return "\n".join(out)


def headline(result: ClaimsResult) -> str:
    """The compact table: one row per cell, every metric."""
    out = ["| context | conc | KV mem | act. mem | weights | total mem | prefill | decode | e2e | greedy same |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{-v:+.0%}"  # noqa: E731
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for c in result.cells:
        r, s = c.memory_reduction, c.speedup
        out.append(f"| {c.context} | {c.concurrency} | {pct(r['kv'])} | {pct(r['activations'])} | {pct(r['weights'])} | "
                   f"{pct(r['total'])} | {x(s['prefill'])} | {x(s['decode'])} | {x(s['e2e'])} | "
                   f"{c.greedy_same}/{c.sequences} |")
    return "\n".join(out)


def drift_table(result: ClaimsResult) -> str:
    out = ["| context | positions | top-1 agreement | KL mean | KL p99 | passkeys ref | passkeys v4 | gate |",
           "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for d in result.drift:
        out.append(f"| {d.context} | {d.positions} | {d.top1_agreement:.3f} | {d.kl_mean:.4f} | {d.kl_p99:.3f} | "
                   f"{f(d.needles_reference)} | {f(d.needles_v4)} | {'FLAG: ' + d.reason if d.flagged else 'ok'} |")
    return "\n".join(out)


def write_report(result: ClaimsResult, out_dir: Path, plots: list[Path]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    eng = "\n".join(f"- **{s}**: " + ", ".join(f"{k} {v}" for k, v in d.items()) for s, d in result.engines.items())
    candidate = result.plan.get("config", "v4")
    doc = [f"# tierlm bench --claims{'' if result.complete else ' (INCOMPLETE)'}", "", f"`{result.command}`", "",
           f"Candidate (\"v4\" below): config `{candidate}`; reference: config `baseline`.", "",
           "## Verdicts", "", *[f"- {v}" for v in result.verdicts], "", "## Engines", "", eng, "",
           "## Every cell (memory: change v4 vs reference; speed: v4 / reference)", "", headline(result), "",
           "## Drift gate on v4", "", drift_table(result), "", "## Per metric", "", tables(result), "",
           "## Definitions", "", (claims.__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    doc += [f"![{p.stem}]({p.name})" for p in plots]
    doc += ["", *[f"- note: {n}" for n in result.notes]]
    path = out_dir / "claims.md"
    path.write_text("\n".join(doc) + "\n")
    return path


def heatmaps(result: ClaimsResult, out_dir: Path) -> list[Path]:
    """One PNG per metric: contexts x concurrency, each cell annotated, the claim's line as the colour midpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    cells = result.cells
    ctxs = sorted({c.context for c in cells})
    concs = sorted({c.concurrency for c in cells})
    at = {(c.context, c.concurrency): c for c in cells}
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in (*MEMORY_METRICS, *SPEED_METRICS):
        memory = m in MEMORY_METRICS
        grid = [[(lambda c: None if c is None else (c.memory_reduction[m] if memory else c.speedup[m]))(at.get((x, n)))
                 for x in ctxs] for n in concs]
        vals = [v for row in grid for v in row if v is not None]
        if not vals:
            continue
        claim = MEMORY_CLAIM if memory else SPEED_CLAIM
        lo, hi = min(vals + [claim - 1e-3]), max(vals + [claim + 1e-3])
        fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(ctxs), 1.2 + 0.9 * len(concs)))
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        im = ax.imshow(data, cmap="RdYlGn", norm=TwoSlopeNorm(vcenter=claim, vmin=lo, vmax=hi), origin="lower",
                       aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.0%}" if memory else f"{v:.2f}x", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(ctxs)), [str(x) for x in ctxs])
        ax.set_yticks(range(len(concs)), [str(n) for n in concs])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("concurrency")
        ax.set_title(f"{m}: {'memory reduction' if memory else 'speed-up'} v4 vs reference "
                     f"(claim {'40%' if memory else '1.8x'})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"claims_{m}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def finish(result: ClaimsResult, plan: ClaimsPlan) -> str:
    """Write the report, plots and JSON; the text printed at the end."""
    plots: list[Path] = []
    if plan.plots and result.cells:
        try:
            plots = heatmaps(result, plan.out_dir)
        except ImportError:
            result.notes.append("plots skipped: matplotlib is not installed")
    report = write_report(result, plan.out_dir, plots)
    if plan.json_path is not None:
        plan.json_path.parent.mkdir(parents=True, exist_ok=True)
        plan.json_path.write_text(json.dumps(result.to_dict(), indent=1))
    text = ["", headline(result), "", drift_table(result), "", *result.verdicts, "", f"report: {report}"]
    return "\n".join(text)
