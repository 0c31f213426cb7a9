"""`tierlm drift`: the numeric-drift check of a candidate engine config against a reference.

    tierlm drift --candidate fp8_e4m3 --quick
    tierlm drift --candidate kv_format=fp8_e4m3_static,kv_scales=scales.json --json drift.json --png drift.png
    tierlm drift --candidate fp8_e4m3 --reference kv_format=fp32,attention_backend=torch --thresholds t.toml
    tierlm drift --candidate fp8_e4m3 --write-golden golden.json      # record this machine's candidate
    tierlm drift --golden golden.json                                   # later / elsewhere: compare to it

Runs both configs on the same inputs (drift.suite: held-out text, greedy prompts, passkey needles, safety
prompts at concurrency 1 and under load), prints a table (metric, reference, candidate, threshold, status)
and exits 1 when a threshold is exceeded (listing which), 0 when none is, 2 on bad input.
Importing this module does not import torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time

from tierlm.core.errors import InvalidParameterError

SIZE_FLAGS = {  # flag dest -> Sizes field
    "passages": "passages", "prompt_tokens": "prompt_tokens", "continuation_tokens": "continuation_tokens",
    "greedy_prompts": "greedy_prompts", "greedy_tokens": "greedy_tokens", "needles": "needles",
    "needle_tokens": "needle_tokens", "safety_prompts": "safety_prompts", "safety_tokens": "safety_tokens",
    "load_concurrency": "load_concurrency",
}
MAX_NEEDLE_LENGTH = 1 << 20
PHASES = ("held-out", "greedy", "needle", "safety")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("drift", help="numeric drift of a candidate engine config (e.g. an FP8 KV format) "
                                            "against a reference: KL, agreement, needles, safety decisions",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face directory, or 'default'")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (both sides)")
    p.add_argument("--candidate", default=None, metavar="CONFIG",
                   help="KV format name or key=value,... over kv_format, kv_scales, attention_backend, dtype, "
                        "quantization, quant_group, quant_activations "
                        "(default with --golden: the config the golden file recorded)")
    p.add_argument("--reference", default="auto", metavar="CONFIG",
                   help="as --candidate (default: the model dtype's KV format, default backend and dtype)")
    p.add_argument("--thresholds", default=None, metavar="FILE.toml", help="override threshold defaults")
    p.add_argument("--json", default=None, metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--png", default=None, metavar="PATH", help="plot KL by position and per-layer K/V error")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write-golden", default=None, metavar="FILE",
                   help="record the candidate's greedy tokens and top-1 logprobs on this machine")
    g.add_argument("--golden", default=None, metavar="FILE", help="compare the candidate against a golden file")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests, smoke runs)")
    p.add_argument("--only", default=None, metavar="PHASES",
                   help=f"run only these measurements, comma-separated among {', '.join(PHASES)} (default: all; "
                        "the K/V error by layer comes with held-out)")
    s = p.add_argument_group("sizes (defaults: the full suite, or --quick's)")
    s.add_argument("--passages", type=int, default=None, help="held-out passages (8)")
    s.add_argument("--prompt-tokens", type=int, default=None, help="prompt tokens per passage (256)")
    s.add_argument("--continuation-tokens", type=int, default=None, help="scored tokens per passage (128)")
    s.add_argument("--greedy-prompts", type=int, default=None, help="greedy chat prompts (16)")
    s.add_argument("--greedy-tokens", type=int, default=None, help="greedy tokens per prompt (48)")
    s.add_argument("--needle-lengths", default=None, metavar="L1,L2,...",
                   help="passkey context lengths in tokens (1024,2048,4096,8192; longer than the model's context: skipped)")
    s.add_argument("--needles", type=int, default=None, help="passkeys per length (4)")
    s.add_argument("--needle-tokens", type=int, default=None, help="greedy tokens of a passkey answer (8)")
    s.add_argument("--safety-prompts", type=int, default=None, help="safety prompts (40, the shipped set)")
    s.add_argument("--safety-tokens", type=int, default=None, help="greedy tokens per safety reply (48)")
    s.add_argument("--load-concurrency", type=int, default=None, help="requests in flight under load (16)")
    p.set_defaults(func=run)
    return p


def sizes_from_args(a):
    from tierlm.drift.suite import QUICK, Sizes

    base = QUICK if a.quick else Sizes()
    over = {}
    for dest, name in SIZE_FLAGS.items():
        v = getattr(a, dest, None)
        if v is not None:
            over[name] = v
    if a.needle_lengths is not None:
        try:
            over["needle_lengths"] = tuple(int(x) for x in a.needle_lengths.split(",") if x.strip())
        except ValueError:
            raise InvalidParameterError(f"--needle-lengths {a.needle_lengths!r} is not a list of token counts",
                                        "write e.g. --needle-lengths 1024,2048") from None
    if a.only is not None:
        phases = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in phases if x not in PHASES]
        if bad or not phases:
            raise InvalidParameterError(f"--only {a.only!r} names no measurement{f' ({bad[0]!r})' if bad else ''}",
                                        f"use a comma-separated list among {', '.join(PHASES)}")
        if a.write_golden and "greedy" not in phases:
            raise InvalidParameterError("--write-golden records the greedy replies, which --only leaves out",
                                        "add greedy to --only")
    skipped = set()  # the count field of each measurement --only leaves out: 0
    for phase, count in (("held-out", "passages"), ("greedy", "greedy_prompts"), ("needle", "needles"),
                         ("safety", "safety_prompts")):
        if a.only is not None and phase not in phases:
            over[count] = 0
            skipped.add(count)
    sizes = dataclasses.replace(base, **over)
    for name in SIZE_FLAGS.values():
        if name in skipped:
            continue
        if getattr(sizes, name) < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} {getattr(sizes, name)} < 1", "use 1 or more")
    from tierlm.drift.inputs import chat_prompt_texts, safety_prompt_rows

    for name, shipped in (("greedy_prompts", len(chat_prompt_texts())), ("safety_prompts", len(safety_prompt_rows()))):
        if getattr(sizes, name) > shipped:
            raise InvalidParameterError(f"--{name.replace('_', '-')} {getattr(sizes, name)}: {shipped} are shipped",
                                        f"use {shipped} or fewer")
    if not sizes.needles:
        sizes = dataclasses.replace(sizes, needle_lengths=())
    bad = [n for n in sizes.needle_lengths if not 128 <= n <= MAX_NEEDLE_LENGTH]
    if bad:
        raise InvalidParameterError(f"needle length {bad[0]} is out of range",
                                    f"use --needle-lengths between 128 and {MAX_NEEDLE_LENGTH}")
    if sizes.needle_tokens >= min(sizes.needle_lengths, default=128):
        raise InvalidParameterError("--needle-tokens leaves no room for the passkey prompt", "use fewer needle tokens")
    return sizes


def run(a) -> int:
    """Parse and check every input first (bad input exits 2 before a model loads), then run both sides."""
    from tierlm.drift import golden as golden_file
    from tierlm.drift.sides import parse_side
    from tierlm.drift.thresholds import Thresholds, load_thresholds

    sizes = sizes_from_args(a)
    thresholds = load_thresholds(a.thresholds) if a.thresholds else Thresholds()
    golden_doc = golden_file.read(a.golden) if a.golden else None
    cand_text = a.candidate
    if cand_text is None:
        if golden_doc is None:
            raise InvalidParameterError("no candidate config", "give --candidate CONFIG (e.g. --candidate fp8_e4m3)")
        cand_text = (golden_doc.get("config") or {}).get("config") or "auto"
    candidate = parse_side(cand_text, "--candidate")
    reference = parse_side(a.reference, "--reference")
    return _run(a, sizes, thresholds, reference, candidate, golden_doc)


def _say(msg: str) -> None:
    print(f"drift: {msg}", file=sys.stderr, flush=True)


def _run(a, sizes, thresholds, reference, candidate, golden_doc) -> int:
    from tierlm.drift import golden as golden_file
    from tierlm.drift import report, suite
    from tierlm.drift.inputs import build_inputs
    from tierlm.drift.sides import describe_engine, engine_config
    from tierlm.engine.llm_engine import LLMEngine

    t_start = time.perf_counter()
    block_size = 16
    num_blocks = -(-sizes.pool_tokens() // block_size) + sizes.load_concurrency + 1
    max_seqs = max(64, sizes.load_concurrency, sizes.greedy_prompts)

    def build(side, name):
        t0 = time.perf_counter()
        engine = LLMEngine(engine_config(side, a.model, a.device, num_blocks, block_size, max_seqs))
        _say(f"{name} {side.label}: {engine.kv_spec.format.name} KV, {engine.attention_backend.name} backend, "
             f"{str(engine.dtype).removeprefix('torch.')} on {engine.device} ({time.perf_counter() - t0:.1f} s)")
        return engine

    ref_engine = build(reference, "reference")
    if golden_doc is not None:
        golden_file.check_model(golden_doc, ref_engine, a.golden)
    lengths = tuple(n for n in sizes.needle_lengths if n <= ref_engine.max_model_len)
    skipped = [n for n in sizes.needle_lengths if n not in lengths]
    if skipped:
        _say(f"needle lengths {skipped} exceed the model's context ({ref_engine.max_model_len}): skipped")
    sizes = dataclasses.replace(sizes, needle_lengths=lengths)
    inputs = build_inputs(ref_engine.tokenizer, sizes)
    recorder = _kv_recorder(candidate, ref_engine)
    golden_prompts = None
    if golden_doc is not None:
        prompts, max_tokens = golden_file.prompts_of(golden_doc)
        if prompts != inputs.greedy or max_tokens != sizes.greedy_tokens:
            golden_prompts = (prompts, max_tokens)

    prog = lambda side: (lambda msg: _say(f"{side} {msg}"))
    ref_run = suite.run_side(ref_engine, inputs, sizes, recorder, progress=prog("reference"))
    ref_desc = describe_engine(reference, ref_engine)
    identity = golden_file.identity(ref_engine)
    del ref_engine
    gc.collect()

    cand_engine = build(candidate, "candidate")
    cand_run = suite.run_side(cand_engine, inputs, sizes, golden=golden_prompts, progress=prog("candidate"))
    cand_desc = describe_engine(candidate, cand_engine)

    results = suite.compare(inputs, sizes, ref_run, cand_run)
    if golden_doc is not None:
        replies = cand_run.golden if cand_run.golden is not None else cand_run.greedy
        results["golden"] = golden_file.compare(golden_doc, replies, cand_desc)
        results["golden"]["path"] = str(a.golden)
    if a.write_golden:
        doc = golden_file.build(cand_engine, cand_desc, inputs.greedy, sizes.greedy_tokens, cand_run.greedy)
        golden_file.write(a.write_golden, doc)
        _say(f"wrote golden file {a.write_golden} ({len(inputs.greedy)} prompts, digest {doc['digest']})")
    del cand_engine
    gc.collect()

    checks = thresholds.evaluate(suite.measured(results))
    failures = [c for c in checks if not c.passed]
    doc = {"model": identity, "reference": ref_desc, "candidate": cand_desc,
           "sizes": dataclasses.asdict(sizes), "needle_lengths_skipped": skipped,
           "thresholds": dataclasses.asdict(thresholds), "results": results,
           "checks": [{"metric": c.metric, "value": c.value, "limit": c.limit, "kind": c.kind, "status": c.status}
                      for c in checks],
           "passed": not failures, "failed": [c.metric for c in failures],
           "seconds": {"reference": ref_run.seconds, "candidate": cand_run.seconds,
                       "total": time.perf_counter() - t_start},
           "machine": golden_file.machine()}

    print(f"tierlm drift: {identity['model_id']}: candidate {report.display(cand_desc)} vs reference "
          f"{report.display(ref_desc)}")
    print(report.format_table(report.table_rows(results, checks)))
    for line in report.summary_lines(doc):
        print(line)
    if a.json:
        report.write_json(a.json, doc)
    if a.png:
        report.write_png(a.png, doc)
    if failures:
        print("drift: FAIL: " + "; ".join(c.describe() for c in failures))
        return 1
    done = [c for c in checks if c.measured]
    print(f"drift: pass ({len(done) - sum(c.advisory for c in done)} checks passed, {sum(c.advisory for c in done)} advisory) "
          f"in {doc['seconds']['total']:.0f} s")
    return 0


def _kv_recorder(candidate, ref_engine):
    """The per-layer K/V error recorder for a scaled (FP8) candidate, else None. A static candidate's scales are
    loaded here as its engine will load them (an error names the fix before anything runs)."""
    if not candidate.scaled:
        return None
    from pathlib import Path

    from tierlm.core.registry import get_kv_format
    from tierlm.drift.kv_error import KVErrorRecorder
    from tierlm.quant.calibration import ModelIdentity, default_path, load_scales

    fmt = get_kv_format(candidate.kv_format)
    fmt.check_head_dim(ref_engine.kv_spec.head_dim)
    scheme = fmt.scheme()
    static = None
    if fmt.static:
        ident = ModelIdentity(ref_engine.model_config.model_id, ref_engine.weights_digest, ref_engine.model_config_digest)
        path = Path(candidate.kv_scales).expanduser() if candidate.kv_scales else default_path(ident)
        scales = load_scales(path, ident, ref_engine.kv_spec.num_layers, ref_engine.kv_spec.num_kv_heads)
        static = scales.scales(scheme.type.max)
    return KVErrorRecorder(ref_engine.runner.backend, ref_engine.kv_storage, scheme, static)
