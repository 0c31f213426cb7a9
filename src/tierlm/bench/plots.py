"""PNG plots: latency CDFs (TTFT and E2E per config) and throughput against concurrency.

matplotlib is imported here only, with the non-interactive Agg backend; without it, plots are
skipped and the report says so.
"""
from __future__ import annotations

from pathlib import Path

from tierlm.bench.results import BenchResult, RunResult, WorkloadInfo


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:60]


def latency_cdf(result: BenchResult, out_dir: Path) -> list[Path]:
    """One PNG per workload: TTFT and E2E CDFs, one line per config, at each config's highest load."""
    plt = _plt()
    paths = []
    for i, w in enumerate(result.workloads, 1):
        runs = [r for r in result.runs if r.workload_spec == w.spec]
        if not runs:
            continue
        top: dict[str, RunResult] = {}
        for r in runs:
            key = (r.rate or 0, r.concurrency or 0)
            cur = top.get(r.config)
            if cur is None or key >= (cur.rate or 0, cur.concurrency or 0):
                top[r.config] = r
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "e2e_ms", "E2E latency")):
            for name, r in top.items():
                xs = sorted(r.samples.get(metric, []))
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.step(xs, ys, where="post", label=f"{name} ({r.arrival})")
            ax.set_xlabel(f"{title} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        paths.append(_save(plt, fig, w, out_dir / f"latency_cdf_{i}_{_slug(w.name)}.png"))
    return paths


def throughput_vs_concurrency(result: BenchResult, out_dir: Path) -> list[Path]:
    """One PNG per workload: output tok/s and TTFT p50 against closed-loop concurrency, one line per config."""
    plt = _plt()
    paths = []
    for i, w in enumerate(result.workloads, 1):
        runs = [r for r in result.runs if r.workload_spec == w.spec and r.rate is None and r.concurrency]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r.config for r in runs):
            pts = sorted(((r.concurrency, r.metrics) for r in runs if r.config == name), key=lambda p: p[0])
            xs = [c for c, _ in pts]
            axes[0].plot(xs, [m.output_tok_per_s or 0 for _, m in pts], marker="o", label=name)
            axes[1].plot(xs, [m.ttft_ms.p50 or 0 for _, m in pts], marker="o", label=name)
        axes[0].set_ylabel("output tok/s")
        axes[1].set_ylabel("TTFT p50 (ms)")
        for ax in axes:
            ax.set_xlabel("concurrency (closed loop)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        paths.append(_save(plt, fig, w, out_dir / f"throughput_{i}_{_slug(w.name)}.png"))
    return paths


def _save(plt, fig, workload: WorkloadInfo, path: Path) -> Path:
    """Title the figure with the workload's shape, write it as PNG and release it."""
    fig.suptitle(f"{workload.name}: {workload.shape}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(result: BenchResult, out_dir: Path) -> tuple[list[Path], str | None]:
    """(paths, None), or ([], reason) when matplotlib is missing."""
    try:
        _plt()
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    return latency_cdf(result, out_dir) + throughput_vs_concurrency(result, out_dir), None
