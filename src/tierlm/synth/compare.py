"""`tierlm synth compare`: one job under two or more engine configs, and what changed against the first.

An architectural change that alters the output distribution (FP8 KV, sparse decoding, quantized weights) should
trigger re-validation of privacy risk, memorization and downstream quality. Each config runs the whole job (with
its scans) into DIR/<config>/; the comparison reports, against the first config, the change in constraint pass
rate, PII rate, leakage, distinct-2, output length and membership AUC, the share of samples whose text is
identical, and speed and cost; a change past its threshold turns the verdict to "re-validate".
"""
from __future__ import annotations

import json
from pathlib import Path

# name -> (default threshold, what it bounds); a change beyond it flags the config
THRESHOLDS = {
    "pass_rate_drop": (0.02, "largest drop in constraint pass rate (absolute)"),
    "pii_rate_rise": (0.01, "largest rise in the share of samples with PII (absolute)"),
    "leakage_rise": (0.01, "largest rise in the share of samples with a verbatim corpus copy (absolute)"),
    "distinct2_change": (0.10, "largest relative change in distinct-2"),
    "length_change": (0.10, "largest relative change in mean output tokens"),
    "auc_rise": (0.05, "largest rise in membership AUC (loss score)"),
}


def metrics(summary: dict) -> dict:
    scans = summary.get("scans") or {}
    pii = scans.get("pii") or {}
    leak = scans.get("leakage") or {}
    auc = (scans.get("membership") or {}).get("auc") or {}
    run = summary["run"]
    return {
        "pass_rate": summary["constraint_pass_rate"], "acceptance_rate": summary["acceptance_rate"],
        "pii_rate": pii.get("rate"),
        "leakage_rate": leak["samples_with_match"] / leak["samples"] if leak.get("samples") else None,
        "leakage_overlap": leak.get("mean_overlap"), "distinct_2": summary["distinct_2"],
        "mean_output_tokens": summary["mean_output_tokens"], "membership_auc": auc.get("loss"),
        "output_tok_per_s": run["output_tok_per_s"], "accepted_per_s": run["accepted_per_s"],
        "usd_per_1k_accepted": run["usd_per_1k_accepted"], "kv_bytes_per_session": run["kv_bytes_per_session"],
    }


def _rel(a, b):
    return None if a is None or b is None or b == 0 else (a - b) / b


def _diff(a, b):
    return None if a is None or b is None else a - b


def flags(ref: dict, m: dict, limits: dict[str, float]) -> list[str]:
    out = []
    checks = (("pass_rate_drop", _diff(ref["pass_rate"], m["pass_rate"]), "constraint pass rate fell by {:.1%}"),
              ("pii_rate_rise", _diff(m["pii_rate"], ref["pii_rate"]), "PII rate rose by {:.1%}"),
              ("leakage_rise", _diff(m["leakage_rate"], ref["leakage_rate"]), "verbatim-copy rate rose by {:.1%}"),
              ("distinct2_change", _rel(m["distinct_2"], ref["distinct_2"]), "distinct-2 changed by {:+.1%}"),
              ("length_change", _rel(m["mean_output_tokens"], ref["mean_output_tokens"]),
               "mean output length changed by {:+.1%}"),
              ("auc_rise", _diff(m["membership_auc"], ref["membership_auc"]), "membership AUC rose by {:+.3f}"))
    for name, value, what in checks:
        if value is None:
            continue
        bound = limits[name]
        over = abs(value) > bound if name.endswith("change") else value > bound
        if over:
            out.append(what.format(value) + f" (limit {bound:g})")
    return out


def same_text(a_dir: Path, b_dir: Path) -> float | None:
    from tierlm.synth.journal import SAMPLES

    def texts(d: Path) -> dict[str, str]:
        return {r["id"]: r["text"] for r in map(json.loads, (d / SAMPLES).read_text().splitlines())}

    a, b = texts(a_dir), texts(b_dir)
    common = [k for k in a if k in b]
    return sum(a[k] == b[k] for k in common) / len(common) if common else None


def compare_job(a) -> dict:
    from tierlm.core.errors import InvalidParameterError
    from tierlm.synth.command import run_with_scans
    from tierlm.synth.job import load_job

    if len(a.config) < 2 or len(set(a.config)) != len(a.config):
        raise InvalidParameterError("synth compare needs two or more different --config", "e.g. --config baseline "
                                                                                          "--config fp8")
    job = load_job(a.job)
    if job.url:
        raise InvalidParameterError("synth compare runs configs in-process; the job names a url",
                                    "remove url from the job (or run each server with tierlm synth --url)")
    if a.usd_per_hour is not None:
        job.usd_per_hour = a.usd_per_hour
    out = Path(a.out) if a.out else Path("synth") / f"{job.name}-compare"
    limits = {name: getattr(a, f"max_{name}") for name in THRESHOLDS}
    rows = {}
    for config in a.config:
        print(f"== {config}")
        s = run_with_scans(job, a, config, out / config, fresh=False, progress=not a.no_progress, limit=a.limit)
        rows[config] = {"metrics": metrics(s), "summary_path": str(out / config / "summary.json")}
    ref_name = a.config[0]
    ref = rows[ref_name]["metrics"]
    for name in a.config[1:]:
        rows[name]["flags"] = flags(ref, rows[name]["metrics"], limits)
        rows[name]["same_text"] = same_text(out / ref_name, out / name)
    flagged = [n for n in a.config[1:] if rows[n]["flags"]]
    verdict = "re-validate" if flagged else "no shift past the thresholds"
    line = (f"verdict: {verdict}" + (f" ({'; '.join(f'{n}: ' + ', '.join(rows[n]['flags']) for n in flagged)})"
                                     if flagged else ""))
    result = {"job": job.name, "reference": ref_name, "configs": rows, "thresholds": limits, "verdict": verdict,
              "verdict_line": line}
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(result))
    return result


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    names = list(result["configs"])
    cols = (("constraint pass", "pass_rate", ".1%"), ("accepted", "acceptance_rate", ".1%"),
            ("PII rate", "pii_rate", ".1%"), ("copy rate", "leakage_rate", ".1%"), ("distinct-2", "distinct_2", ".3f"),
            ("mean tokens", "mean_output_tokens", ".1f"), ("MIA AUC", "membership_auc", ".3f"),
            ("tok/s", "output_tok_per_s", ",.1f"), ("accepted/s", "accepted_per_s", ".3f"),
            ("$/1k accepted", "usd_per_1k_accepted", ".4f"))
    lines = [f"# synth compare `{result['job']}` (reference: `{result['reference']}`)", "",
             "| config | " + " | ".join(c[0] for c in cols) + " | same text | flags |",
             "|---" * (len(cols) + 3) + "|"]
    for n in names:
        row = result["configs"][n]
        m = row["metrics"]
        lines.append(f"| {n} | " + " | ".join(_f(m[k], s) for _, k, s in cols)
                     + f" | {_f(row.get('same_text'), '.1%')} | {'; '.join(row.get('flags', [])) or '-'} |")
    lines += ["", f"**Verdict: {result['verdict']}.**", ""]
    return "\n".join(lines)
