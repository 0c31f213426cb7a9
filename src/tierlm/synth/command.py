"""`tierlm synth`: costed synthetic-data jobs with guided decoding, privacy scans and re-validation.

    tierlm synth JOB.yaml [--out DIR] [--config NAME | --url URL] [--usd-per-hour X]      run (or resume) a job
    tierlm synth scan {constraint,pii,leakage,membership} SAMPLES.jsonl [...]             one scan on any samples
    tierlm synth compare JOB.yaml --config A --config B [--out DIR]                       the job under two configs

A job writes DIR/samples.jsonl (every sample, in job order, with why it was rejected), accepted.jsonl,
summary.json, scan.json, report.md and report.png. Killed, it resumes where it stopped when run again with the
same --out (no record lost or repeated). --config takes any `tierlm bench` config name (baseline, fp8, v4,
q4_1...). See tierlm/synth/job.py for every job key. Importing this module does not import torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tierlm.core.errors import InvalidParameterError

SCANS = ("constraint", "pii", "leakage", "membership")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help="synthetic-data jobs: guided decoding, dedup, privacy scans, cost",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              add_help=False)
    p.add_argument("-h", "--help", action="store_true", dest="synth_help", help="show this help")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_synth)
    return p


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together (in-process)")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV pool size (in-process)")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierlm synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="the job (YAML)")
    p.add_argument("--out", default=None, help="output directory (default: synth/<job name>)")
    p.add_argument("--config", default="baseline", help="in-process engine config: a `tierlm bench` config name")
    p.add_argument("--url", default=None, help="an OpenAI-compatible server to run against (overrides the job's)")
    p.add_argument("--api-key", default=None, help="bearer token for --url")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight against --url")
    p.add_argument("--usd-per-hour", type=float, default=None, help="the machine's price (overrides the job's)")
    p.add_argument("--limit", type=int, default=None, help="generate at most this many samples now (resumable)")
    p.add_argument("--fresh", action="store_true", help="start over (earlier records are kept as .old)")
    p.add_argument("--no-scan", action="store_true", help="skip the scans at the end")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, metavar="PATH", help="write the summary here too")
    _engine_args(p)
    return p


def scan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierlm synth scan", description="one scan on a JSONL of samples")
    p.add_argument("scan", choices=SCANS)
    p.add_argument("samples", nargs="?", default=None, help="JSONL with a text field (synth's accepted.jsonl...)")
    p.add_argument("--all", action="store_true", help="scan rejected samples too")
    p.add_argument("--corpus", nargs="+", default=[], help="leakage: reference corpus files or directories")
    p.add_argument("--n", type=int, default=8, help="leakage: words per n-gram")
    p.add_argument("--threshold", type=float, default=0.4, help="pii: minimum recognizer score (phones score 0.4)")
    p.add_argument("--redacted", default=None, help="pii: write a redacted copy of the samples here")
    p.add_argument("--model", default=None, help="membership: the model to score under (default: the default)")
    p.add_argument("--reference-model", default=None, help="membership: reference model for the loss ratio")
    p.add_argument("--members", default=None, help="membership: texts the model trained on (lines or JSONL)")
    p.add_argument("--nonmembers", default=None, help="membership: held-out texts")
    p.add_argument("--train-run", default=None, help="membership: a `tierlm train` run: its training vs held-out "
                                                     "documents are the split, its model the target")
    p.add_argument("--limit", type=int, default=200, help="membership: documents per side of a --train-run split")
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def compare_parser() -> argparse.ArgumentParser:
    from tierlm.synth.compare import THRESHOLDS

    p = argparse.ArgumentParser(prog="tierlm synth compare",
                                description="run a job under two or more configs and report the distribution shift")
    p.add_argument("job")
    p.add_argument("--config", action="append", required=True, help="a `tierlm bench` config name (give 2+); the "
                                                                     "first is the reference")
    p.add_argument("--out", default=None, help="directory (default: synth/<job name>-compare)")
    p.add_argument("--usd-per-hour", type=float, default=None)
    p.add_argument("--limit", type=int, default=None, help="samples per config (default: the whole job)")
    for name, (default, what) in THRESHOLDS.items():
        p.add_argument(f"--max-{name.replace('_', '-')}", type=float, default=default, dest=f"max_{name}", help=what)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, metavar="PATH")
    _engine_args(p)
    return p


def cmd_synth(a) -> int:
    argv = list(a.argv)
    if getattr(a, "synth_help", False) or not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv or getattr(a, "synth_help", False) else 2
    if argv[0] == "scan":
        return cmd_scan(scan_parser().parse_args(argv[1:]))
    if argv[0] == "compare":
        return cmd_compare(compare_parser().parse_args(argv[1:]))
    return cmd_run(run_parser().parse_args(argv))


def _bytes(text: str) -> int:
    from tierlm.args import parse_bytes

    return parse_bytes(text)


def make_backend(job, a, config: str, out: Path):
    from tierlm.synth.runner import EngineBackend, URLBackend

    url = getattr(a, "url", None) or job.url
    if url:
        return URLBackend(job, url, concurrency=a.concurrency, api_key=a.api_key)
    return EngineBackend(job, config, max_num_seqs=a.max_num_seqs, kv_memory=_bytes(a.kv_cache_memory), out=out)


def run_with_scans(job, a, config: str, out: Path, *, fresh: bool, progress: bool, limit: int | None,
                   scan: bool = True) -> dict:
    from tierlm.synth.journal import Journal
    from tierlm.synth.report import write_report
    from tierlm.synth.runner import run_job

    Journal(out, job.digest, fresh=fresh)  # a journal that cannot resume stops the job before the model loads
    backend = make_backend(job, a, config, out)
    try:
        summary = run_job(job, out, backend, progress=progress, limit=limit)
        scans = job_scans(job, out, backend) if scan and summary["finished"] else None
    finally:
        backend.close()
    if scans is not None:
        (out / "scan.json").write_text(json.dumps(scans, indent=2) + "\n")
        summary["scans"] = scans
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(summary, Journal(out, job.digest).records, out, scans)
    return summary


def job_scans(job, out: Path, backend) -> dict:
    from tierlm.synth.journal import Journal
    from tierlm.synth.scans import constraint_scan, leakage_scan, membership_scan, pii_scan

    records = Journal(out, job.digest).records
    accepted = [r for r in records if r["accepted"]]
    scans: dict = {"constraint": constraint_scan(records)}
    spec = job.scan
    if spec.pii:
        scans["pii"] = pii_scan(accepted, out / "accepted.redacted.jsonl", spec.pii_threshold)
    if spec.leakage:
        scans["leakage"] = leakage_scan(accepted, list(spec.leakage), spec.leakage_n)
    if spec.membership or spec.members:
        engine = getattr(backend, "engine", None)
        if engine is None:
            raise InvalidParameterError("the membership scan scores texts under the generating model in-process",
                                        "run the job in-process (no url), or use tierlm synth scan membership --model")
        from tierlm.synth.membership import read_texts

        reference = _engine(spec.reference_model) if spec.reference_model else None
        try:
            scans["membership"] = membership_scan(
                accepted, engine, read_texts(spec.members) if spec.members else None,
                read_texts(spec.nonmembers) if spec.nonmembers else None, reference)
        finally:
            if reference is not None:
                reference.close()
    return scans


def _engine(model: str | None):
    from tierlm.config import CacheConfig, EngineConfig
    from tierlm.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, cache=CacheConfig(memory_bytes=512 << 20)))


def _print_summary(s: dict, out: Path) -> None:
    run = s["run"]
    pr = s["constraint_pass_rate"]
    cost = ""
    if run["usd_per_1k_accepted"] is not None:
        cost = (f", ${run['usd_per_million_output_tokens']:.4f}/1M output tokens, "
                f"${run['usd_per_1k_accepted']:.4f}/1,000 accepted")
    tok_s = f"{run['output_tok_per_s']:,.1f} tok/s" if run["output_tok_per_s"] else "nothing generated"
    print(f"{s['job']}: {s['done']:,}/{s['samples']:,} samples, {s['accepted']:,} accepted "
          f"(constraint pass {'-' if pr is None else f'{pr:.1%}'}), {tok_s}{cost}")
    print(f"output: {out}/accepted.jsonl  report: {out}/report.md")


def cmd_run(a) -> int:
    from tierlm.synth.job import load_job

    job = load_job(a.job)
    if a.usd_per_hour is not None:
        job.usd_per_hour = a.usd_per_hour
    out = Path(a.out) if a.out else Path("synth") / job.name
    s = run_with_scans(job, a, a.config, out, fresh=a.fresh, progress=not a.no_progress, limit=a.limit,
                       scan=not a.no_scan)
    _print_summary(s, out)
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=2) + "\n")
    return 0


def cmd_scan(a) -> int:
    from tierlm.synth import scans as sc

    if a.samples is None and not (a.scan == "membership" and (a.train_run or (a.members and a.nonmembers))):
        raise InvalidParameterError(f"synth scan {a.scan} needs a samples file", "pass SAMPLES.jsonl")
    records = sc.read_samples(a.samples, accepted_only=not a.all) if a.samples else []
    if a.scan == "constraint":
        result = sc.constraint_scan(sc.read_samples(a.samples))
    elif a.scan == "pii":
        result = sc.pii_scan(records, Path(a.redacted) if a.redacted else None, a.threshold)
    elif a.scan == "leakage":
        if not a.corpus:
            raise InvalidParameterError("synth scan leakage needs a reference corpus", "pass --corpus PATH [PATH...]")
        result = sc.leakage_scan(records, a.corpus, a.n)
    else:
        result = _membership(a, records)
    text = json.dumps(result, indent=2)
    print(text if len(text) < 4000 else "\n".join(sc.scans_markdown({a.scan: result})))
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


def _membership(a, records: list[dict]) -> dict:
    from tierlm.synth import membership as mi
    from tierlm.synth.scans import membership_scan

    model = a.model
    members = nonmembers = None
    if a.train_run:
        model = model or str(Path(a.train_run) / "model")
    engine = _engine(model)
    reference = _engine(a.reference_model) if a.reference_model else None
    try:
        if a.train_run:  # the run's own token ids: no re-tokenization
            m_ids, n_ids = mi.run_split(a.train_run, a.limit)
            sm = mi.scores(engine, token_lists=m_ids, reference=reference)
            sn = mi.scores(engine, token_lists=n_ids, reference=reference)
            result = membership_scan(records, engine, reference=reference) if records else {}
            result["split"] = {"members": len(m_ids), "nonmembers": len(n_ids), "run": a.train_run}
            result["auc"] = {k: mi.auc(sm.get(k), sn.get(k)) for k in ("loss", "min_k", "ratio")
                             if sm.get(k) is not None}
            return result
        if a.members:
            members, nonmembers = mi.read_texts(a.members), mi.read_texts(a.nonmembers)
        return membership_scan(records, engine, members, nonmembers, reference)
    finally:
        engine.close()
        if reference is not None:
            reference.close()


def cmd_compare(a) -> int:
    from tierlm.synth.compare import compare_job

    result = compare_job(a)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(result["verdict_line"])
    return 0


if __name__ == "__main__":
    sys.exit(cmd_synth(argparse.Namespace(argv=sys.argv[1:], synth_help=False)))
