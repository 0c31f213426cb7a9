"""The scans a synth job runs at its end (and `tierlm synth scan` runs on any JSONL of samples):

  constraint  pass rate and the reasons samples failed (from the records: synth/check.py decided them)
  pii         entities found per type, the share of samples with any, a redacted copy (synth/pii.py)
  leakage     word n-gram overlap with a reference corpus and the longest verbatim copies (synth/leakage.py)
  membership  loss-based scores of the samples under the generating model and, given a member/non-member split,
              the attack AUC of each score (synth/membership.py)

Each returns a JSON-friendly dict; scan.json holds them all and report.md shows them.
"""
from __future__ import annotations

import json
from pathlib import Path

from tierlm.core.errors import InvalidParameterError


def read_samples(path: str | Path, accepted_only: bool = False) -> list[dict]:
    """Records of a JSONL file of samples (synth's samples.jsonl / accepted.jsonl, or any JSONL with "text")."""
    path = Path(path)
    if not path.exists():
        raise InvalidParameterError(f"samples file {path} does not exist", "pass a synth output (accepted.jsonl)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise InvalidParameterError(f"{path} line {n} is not JSON", "fix or drop the line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise InvalidParameterError(f"{path} line {n} has no \"text\" string", "give records with a text field")
        if not accepted_only or rec.get("accepted", True):
            out.append(rec)
    return out


def constraint_scan(records: list[dict]) -> dict:
    from tierlm.synth.runner import reject_counts

    done = len(records)
    failed = [r for r in records if not r.get("accepted", True)
              and not str(r.get("reject")).startswith(("duplicate", "near-duplicate"))]
    return {"samples": done, "pass_rate": (done - len(failed)) / done if done else None,
            "failures": reject_counts(failed), "examples": [{"id": r.get("id"), "reason": r.get("reject")}
                                                            for r in failed[:10]]}


def pii_scan(records: list[dict], out: Path | None = None, threshold: float = 0.4) -> dict:
    from tierlm.synth.pii import PiiScanner

    scanner = PiiScanner(threshold=threshold)
    texts = [r["text"] for r in records]
    report = scanner.scan(texts)
    if out is not None:
        with open(out, "w", encoding="utf-8") as f:
            for r, spans in zip(records, report.per_sample):
                f.write(json.dumps(dict(r, text=scanner.redact(r["text"], spans), pii=[s.entity for s in spans]),
                                   ensure_ascii=False) + "\n")
    d = report.to_dict()
    d["redacted"] = str(out) if out is not None else None
    return d


def leakage_scan(records: list[dict], corpus: list[str], n: int = 8, top: int = 10) -> dict:
    from tierlm.synth.leakage import LeakageIndex

    index = LeakageIndex.from_paths(corpus, n=n)
    d = index.scan([r["text"] for r in records], top=top).to_dict()
    d["corpus"] = [str(p) for p in corpus]
    ids = [r.get("id") for r in records]
    for m in d.get("longest", []):
        m["id"] = ids[m["sample"]] if 0 <= m["sample"] < len(ids) else None
    return d


def membership_scan(records: list[dict], engine, members: list[str] | None = None,
                    nonmembers: list[str] | None = None, reference=None) -> dict:
    """Scores of the samples under `engine` (summary statistics), and with a split, the AUC of each score."""
    import numpy as np

    from tierlm.synth import membership as mi

    texts = [r["text"] for r in records if len(r["text"].split()) >= 2]
    d: dict = {"samples_scored": len(texts)}
    if texts:
        s = mi.scores(engine, texts, reference=reference)
        d["samples"] = {name: {"mean": float(np.mean(v)), "p90": float(np.percentile(v, 90))}
                        for name in ("loss", "min_k", "ratio") if (v := s.get(name)) is not None}
    if members and nonmembers:
        sm = mi.scores(engine, members, reference=reference)
        sn = mi.scores(engine, nonmembers, reference=reference)
        d["split"] = {"members": len(members), "nonmembers": len(nonmembers)}
        d["auc"] = {name: mi.auc(sm.get(name), sn.get(name)) for name in ("loss", "min_k", "ratio")
                    if sm.get(name) is not None}
    return d


def scans_markdown(scans: dict) -> list[str]:
    lines = ["## Scans", ""]
    c = scans.get("constraint")
    if c:
        pr = c["pass_rate"]
        lines += [f"- constraint: {'-' if pr is None else f'{pr:.1%}'} pass"
                  + (f"; failures: {', '.join(f'{k} {v}' for k, v in c['failures'].items())}" if c["failures"] else "")]
    p = scans.get("pii")
    if p:
        counts = ", ".join(f"{k} {v}" for k, v in p.get("counts", {}).items()) or "none"
        lines += [f"- PII: {p.get('samples_with_pii', 0)} of {p.get('samples', 0)} samples ({counts}); redacted copy "
                  f"`{Path(p['redacted']).name if p.get('redacted') else '-'}`"]
    lk = scans.get("leakage")
    if lk:
        lines += [f"- leakage vs {', '.join(Path(x).name for x in lk.get('corpus', []))}: mean {lk.get('n', 8)}-gram "
                  f"overlap {lk.get('mean_overlap', 0):.2%}, {lk.get('samples_with_match', 0)} samples with a verbatim "
                  "copy"]
        for m in lk.get("longest", [])[:5]:
            lines.append(f"  - `{m.get('id')}`: {m['words']} words: \"{m['text'][:160]}\"")
    ms = scans.get("membership")
    if ms:
        if ms.get("samples"):
            lines += ["- membership scores of the samples: " + ", ".join(
                f"{k} mean {v['mean']:.3f}" for k, v in ms["samples"].items())]
        if ms.get("auc"):
            lines += [f"- membership AUC ({ms['split']['members']} members vs {ms['split']['nonmembers']} "
                      "non-members): " + ", ".join(f"{k} {v:.3f}" for k, v in ms["auc"].items())]
    return lines
