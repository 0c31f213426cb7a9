"""A synth job's summary (counts, pass rates, cost) and its report: report.md with report.png."""
from __future__ import annotations

import re
from pathlib import Path

from tierlm.synth.job import Job

_WORD = re.compile(r"\w+", re.UNICODE)


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct word n-grams / all word n-grams over the texts (a diversity figure); None without n-grams."""
    total, seen = 0, set()
    for t in texts:
        w = _WORD.findall(t.casefold())
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def summarize(job: Job, records: list[dict], stats, *, resumed_from: int, total: int,
              usd_per_hour: float | None) -> dict:
    from tierlm.synth.runner import reject_counts

    done = len(records)
    accepted = [r for r in records if r["accepted"]]
    valid = [r for r in records if r["accepted"] or str(r["reject"]).startswith(("duplicate", "near-duplicate"))]
    ranges = stats.extra.get("ranges", [(resumed_from, resumed_from + stats.samples)])
    run_accepted = sum(1 for a, b in ranges for r in records[a:b] if r["accepted"])
    tok_s = stats.output_tokens / stats.wall_s if stats.wall_s > 0 and stats.output_tokens else None
    acc_s = run_accepted / stats.wall_s if stats.wall_s > 0 and run_accepted else None
    usd_m = usd_per_hour / 3600.0 / tok_s * 1e6 if usd_per_hour is not None and tok_s else None
    usd_k = usd_per_hour / 3600.0 / acc_s * 1000 if usd_per_hour is not None and acc_s else None
    texts = [r["text"] for r in accepted]
    return {
        "job": job.name, "job_digest": job.digest, "model": stats.model, "config": stats.config,
        "backend": stats.backend, "config_digest": stats.config_digest,
        "samples": total, "done": done, "finished": done == total, "resumed_from": resumed_from,
        "accepted": len(accepted), "rejected": done - len(accepted),
        "acceptance_rate": len(accepted) / done if done else None,
        "constraint_pass_rate": len(valid) / done if done else None,
        "reject_reasons": reject_counts(records),
        "mean_output_tokens": sum(r["output_tokens"] for r in records) / done if done else None,
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "run": {"sessions": stats.extra.get("sessions", 1 if stats.samples else 0), "samples": stats.samples, "output_tokens": stats.output_tokens, "prompt_tokens": stats.prompt_tokens,
                "wall_s": stats.wall_s, "output_tok_per_s": tok_s, "accepted": run_accepted,
                "accepted_per_s": acc_s, "usd_per_hour": usd_per_hour, "usd_per_million_output_tokens": usd_m,
                "usd_per_1k_accepted": usd_k, "kv_bytes_per_token": stats.kv_bytes_per_token,
                "kv_bytes_per_session": stats.kv_bytes_per_session, "peak_sessions": stats.peak_sessions},
    }


def _fmt(v, spec: str = ",.2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def write_report(summary: dict, records: list[dict], out: Path, scans: dict | None = None) -> Path:
    """report.md (+ report.png: reject reasons and output lengths) in `out`; returns the Markdown path."""
    png = out / "report.png"
    _plot(summary, records, png)
    run = summary["run"]
    lines = [
        f"# synth job `{summary['job']}`", "",
        f"Model `{summary['model']}`, config `{summary['config']}` ({summary['backend']}); job digest "
        f"`{summary['job_digest']}`.", "",
        "| | |", "|---|---|",
        f"| samples | {summary['done']:,} of {summary['samples']:,}"
        + (f" ({summary['resumed_from']:,} from an earlier run)" if summary["resumed_from"] else "") + " |",
        f"| accepted | {summary['accepted']:,} ({_fmt(summary['acceptance_rate'], '.1%')}) |",
        f"| constraint pass rate | {_fmt(summary['constraint_pass_rate'], '.1%')} |",
        f"| mean output tokens | {_fmt(summary['mean_output_tokens'], ',.1f')} |",
        f"| distinct-1 / distinct-2 (accepted) | {_fmt(summary['distinct_1'], '.3f')} / "
        f"{_fmt(summary['distinct_2'], '.3f')} |",
        f"| output tok/s ({run['sessions']} session{'s' if run['sessions'] != 1 else ''}) | {_fmt(run['output_tok_per_s'], ',.1f')} |",
        f"| accepted samples/s | {_fmt(run['accepted_per_s'], ',.3f')} |",
        f"| $ / 1M output tokens | {_fmt(run['usd_per_million_output_tokens'], ',.4f')} |",
        f"| $ / 1,000 accepted samples | {_fmt(run['usd_per_1k_accepted'], ',.4f')} |",
        f"| KV bytes / token | {_fmt(run['kv_bytes_per_token'], ',.0f')} |",
        f"| KV per concurrent session (peak, {run['peak_sessions']} sessions) | "
        f"{_fmt(None if run['kv_bytes_per_session'] is None else run['kv_bytes_per_session'] / 2**20, ',.2f')} MiB |",
        "", "## Rejected", "",
    ]
    if summary["reject_reasons"]:
        lines += ["| reason | samples |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in summary["reject_reasons"].items()]
        examples = [r for r in records if not r["accepted"]][:5]
        lines += ["", "Examples:", ""] + [f"- `{r['id']}`: {r['reject']}" for r in examples]
    else:
        lines.append("None.")
    if scans:
        from tierlm.synth.scans import scans_markdown

        lines += ["", *scans_markdown(scans)]
    lines += ["", f"![report]({png.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(summary: dict, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    reasons = {"accepted": summary["accepted"], **summary["reject_reasons"]}
    a.barh(list(reasons)[::-1], list(reasons.values())[::-1], color=["#c44"] * (len(reasons) - 1) + ["#4a4"])
    a.set_title("samples by outcome")
    a.set_xlabel("samples")
    acc = [r["output_tokens"] for r in records if r["accepted"]]
    rej = [r["output_tokens"] for r in records if not r["accepted"]]
    b.hist([acc, rej], bins=30, stacked=True, label=["accepted", "rejected"], color=["#4a4", "#c44"])
    b.set_title("output tokens per sample")
    b.set_xlabel("tokens")
    b.legend()
    fig.suptitle(f"synth {summary['job']}: {summary['config']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
