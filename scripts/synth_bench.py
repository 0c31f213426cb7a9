"""The synth benchmark (issue 15): a 1,000-sample JSON-schema job on the default model under several engine
configs, in one run, plus guided decoding's overhead against the same job unconstrained.

For each config: accepted samples per second, $ per 1,000 accepted samples (--usd-per-hour), output tok/s, the
constraint pass rate and the share of samples whose text equals the first config's (seeded sampling: an exact
config gives the same samples). The overhead run takes the first config's guided samples and generates the same
prompts with the same seeds unconstrained, each forced to the guided sample's length (ignore_eos), so both runs
compute the same number of tokens in the same batches: overhead = guided wall time / unconstrained wall time - 1.

    python scripts/synth_bench.py --out synth-bench [--samples 1000] [--config baseline --config fp8 ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tierlm.synth.job import job_from_dict
from tierlm.synth.runner import EngineBackend, run_job

JOBS = ["baker", "pilot", "nurse", "farmer", "teacher", "chemist", "sailor", "judge", "poet", "miner", "tailor",
        "plumber", "dentist", "architect", "librarian", "jeweller", "beekeeper", "surveyor", "glassblower", "cook",
        "painter", "welder", "florist", "clockmaker", "ranger"]
CITIES = ["Oslo", "Lima", "Rome", "Kyoto", "Accra"]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 32}, "age": {"type": "integer", "minimum": 18, "maximum": 90},
    "city": {"type": "string", "maxLength": 20}, "skills": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                            "maxItems": 3}},
    "required": ["name", "age", "city", "skills"], "additionalProperties": False}


def job_doc(samples: int) -> dict:
    per = max(1, samples // (len(JOBS) * len(CITIES)))
    return {"name": "synth-bench", "templates": {"person": "Invent a {{ job }} who lives in {{ city }}. Reply with a "
                                                           "JSON object: name, age, city and up to three skills."},
            "variables": {"job": JOBS, "city": CITIES}, "samples_per_prompt": per, "seed": 0,
            "sampling": {"temperature": 0.8, "max_tokens": 128}, "constraint": {"json": SCHEMA},
            "dedup": {"near_threshold": 0.9}, "scan": {"pii": False}}


class ForcedLengths(EngineBackend):
    """The job unconstrained, each sample forced to a given length (same tokens, same batches)."""

    def __init__(self, *a, lengths: dict[str, int], **kw):
        super().__init__(*a, **kw)
        self.lengths = lengths

    def params(self, sample):
        p = super().params(sample)
        p.max_tokens, p.ignore_eos, p.min_tokens = self.lengths[sample.id], True, 0
        return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="synth-bench")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--usd-per-hour", type=float, default=1.0)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    a = ap.parse_args()
    configs = a.config or ["baseline", "fp8", "q4_1-int8"]
    out = Path(a.out)
    doc = dict(job_doc(a.samples), usd_per_hour=a.usd_per_hour)
    job = job_from_dict(doc, Path("."))
    rows = {}
    first_texts = None
    for config in configs:
        backend = EngineBackend(job, config, max_num_seqs=a.max_num_seqs, out=out / config)
        try:
            s = run_job(job, out / config, backend, fresh=True, progress=False)
        finally:
            backend.close()
        recs = [json.loads(line) for line in (out / config / "samples.jsonl").read_text().splitlines()]
        texts = [r["text"] for r in recs]
        first_texts = first_texts or texts
        rows[config] = {"accepted": s["accepted"], "samples": s["done"], "pass_rate": s["constraint_pass_rate"],
                        "accepted_per_s": s["run"]["accepted_per_s"], "tok_s": s["run"]["output_tok_per_s"],
                        "usd_per_1k_accepted": s["run"]["usd_per_1k_accepted"], "wall_s": s["run"]["wall_s"],
                        "output_tokens": s["run"]["output_tokens"],
                        "same_text": sum(x == y for x, y in zip(texts, first_texts)) / len(texts)}
        print(config, json.dumps(rows[config]), flush=True)
        if config == configs[0]:
            lengths = {r["id"]: max(1, r["output_tokens"]) for r in recs}
    free_job = job_from_dict(dict(doc, constraint=None), Path("."))
    backend = ForcedLengths(free_job, configs[0], max_num_seqs=a.max_num_seqs, lengths=lengths)
    t0 = time.perf_counter()
    try:
        s = run_job(free_job, out / "unconstrained", backend, fresh=True, progress=False)
    finally:
        backend.close()
    free = {"wall_s": s["run"]["wall_s"], "output_tokens": s["run"]["output_tokens"], "tok_s": s["run"]["output_tok_per_s"],
            "total_s": time.perf_counter() - t0}
    guided = rows[configs[0]]
    result = {"configs": rows, "unconstrained": free, "usd_per_hour": a.usd_per_hour,
              "guided_overhead": guided["wall_s"] / free["wall_s"] - 1, "samples": a.samples}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| config | accepted | constraint pass | accepted/s | output tok/s | $ / 1,000 accepted | same text as "
             f"{configs[0]} |", "|---|---|---|---|---|---|---|"]
    for c, r in rows.items():
        lines.append(f"| {c} | {r['accepted']}/{r['samples']} | {r['pass_rate']:.1%} | {r['accepted_per_s']:.3f} | "
                     f"{r['tok_s']:.1f} | {r['usd_per_1k_accepted']:.4f} | {r['same_text']:.1%} |")
    lines += ["", f"guided decoding overhead ({configs[0]}): {guided['wall_s']:.1f} s guided vs {free['wall_s']:.1f} s "
                  f"unconstrained at the same {free['output_tokens']:,} output tokens: "
                  f"{result['guided_overhead']:+.1%} (target < 10%)"]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
