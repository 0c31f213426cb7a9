"""`tierlm bench`: the representative load test. `add_parser(subparsers)` registers it with the CLI.

    tierlm bench --quick                          # < 3 min on a 2-core CPU: headline table + report
    tierlm bench --workload multi-turn:users=8 --workload long-doc-qa --concurrency 1 4 16 --reps 3
    tierlm bench --config baseline prefix-cache --rate 2 --burstiness 0.5 --slo-ttft-ms 500
    tierlm bench --peer-url http://127.0.0.1:8080  # also drive llama.cpp's server (or vLLM, or ours)
    tierlm bench --configs all,tiers,tiers-redis --concurrency 1 --kv-cache-memory 288MiB
                 --workload long-doc-qa:docs=6,doc=4096,questions=3,q=32   # KV tiers: pool ~1/4 of it
    tierlm bench --list                           # workloads, their knobs, and configurations
    tierlm bench --claims [--quick]               # the "40% less memory, 1.8x faster" claims: v4 vs reference
                                                  # over contexts x concurrency (bench/claims.py)

KV tiers (configs `tiers`, `all`: host + disk; `tiers-redis`: Redis only): --host-cache-memory defaults to
4x --kv-cache-memory, the disk tier to a fresh temporary directory (under --disk-cache-dir if given) removed
at the end, Redis to --redis-url or else a local server started for the run.

Writes OUT/report.md and PNG plots (default OUT = ./bench-out), and --json PATH. Exits 1 when the
correctness gate flags a configuration (--allow-flagged: report it and exit 0). Ctrl-C writes what was
measured, marked incomplete, and exits 130. Importing this module does not import torch.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tierlm.args import add_tier_args, parse_bytes

_QUICK = {
    "workloads": ["multi-turn:users=4,rounds=3,sys=192,user=24,osl=24"],
    "concurrency": [1, 4], "reps": 2, "warmup": 2, "gate_prompts": 4, "gate_tokens": 24, "gate_long_len": 320,
    "phases": dict(prefill_lens=(256,), prompt_len=32, new_tokens=32, batches=(1, 16), reps=2),
}
_FULL = {
    "workloads": ["short-chat", "fixed", "long-doc-qa", "multi-turn", "batch-gen:n=16,osl=128"],
    "concurrency": [1, 4, 16], "reps": 3, "warmup": 2, "gate_prompts": 6, "gate_tokens": 32, "gate_long_len": 640,
    "phases": dict(prefill_lens=(512, 2048), prompt_len=32, new_tokens=64, batches=(1, 16), reps=2),
}
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="load test: memory and speed of each configuration vs the baseline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small plan that finishes in < 3 minutes on 2 CPU cores")
    p.add_argument("--list", action="store_true", help="list workloads (with knobs) and configurations, then exit")
    g = p.add_argument_group("claims check (--claims)")
    g.add_argument("--claims", action="store_true",
                   help="test the headline claims: config v4 (prefix cache + tiers + sparse decode picked by FP8 index keys) vs the "
                        "reference over a grid of contexts x --concurrency; memory split KV/activations/weights/"
                        "total, speed split prefill/decode/e2e, heatmaps, verdicts, v4's drift gate")
    g.add_argument("--claims-contexts", type=int, nargs="+", default=None, metavar="TOKENS",
                   help="context lengths of the grid (default 1024 2048 4096 8192; --quick: 1024 2048)")
    g.add_argument("--claims-new-tokens", type=int, default=None, help="greedy tokens per request (default 32)")
    g.add_argument("--claims-budget", type=int, default=1024, metavar="TOKENS",
                   help="v4's sparse budget: KV tokens a decode step reads per sequence (default 1024)")
    g.add_argument("--claims-config", default="v4", metavar="NAME",
                   help="the candidate config (default v4; v4-fp8: FP8 KV + Quest picks, the first v4)")
    g.add_argument("--claims-needles", type=int, default=None,
                   help="passkey probes per context in v4's drift gate (default 4; --quick: 1)")
    g = p.add_argument_group("what to run")
    g.add_argument("--workload", action="append", default=None, metavar="SPEC",
                   help="NAME or NAME:knob=v,... (repeatable; see --list)")
    g.add_argument("--config", "--configs", nargs="+", action="extend", default=None, metavar="NAME",
                   help="configurations, space- or comma-separated (default: every registered one; tiers-redis "
                        "only with --redis-url)")
    g.add_argument("--concurrency", nargs="+", type=int, default=None, help="closed-loop concurrency sweep")
    g.add_argument("--rate", type=float, default=None, help="open loop: requests/s (Poisson-like arrivals)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    g.add_argument("--reps", type=int, default=None, help="repetitions per run (spread is reported)")
    g.add_argument("--warmup", type=int, default=None, help="unmeasured warm-up requests per config")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("metrics")
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--slo-e2e-ms", type=float, default=None)
    g.add_argument("--usd-per-hour", type=float, default=None, help="machine price, for $ per 1M output tokens")
    g.add_argument("--memory-budget", type=parse_bytes, default=parse_bytes("8GiB"), help="budget for max sessions that fit")
    g.add_argument("--gate-prompts", type=int, default=None, help="chat prompts in the correctness gate")
    g.add_argument("--gate-tokens", type=int, default=None, help="greedy tokens per gate prompt")
    g.add_argument("--gate-long-len", type=int, default=None,
                   help="tokens of the gate's long prompts (cut from a shipped public-domain text; 0: none)")
    g.add_argument("--allow-flagged", action="store_true",
                   help="exit 0 even when the gate flags a configuration (it is still reported)")
    g.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    g = p.add_argument_group("peers")
    g.add_argument("--no-peer", action="store_true", help="skip the transformers generate() peer")
    g.add_argument("--peer-prefill-len", type=int, nargs="+", default=None)
    g.add_argument("--peer-prompt-len", type=int, default=None)
    g.add_argument("--peer-new-tokens", type=int, default=None)
    g.add_argument("--peer-batch", nargs="+", type=int, default=None)
    g.add_argument("--peer-url", action="append", default=[], metavar="URL",
                   help="an OpenAI-compatible server to drive over HTTP as well (repeatable)")
    g.add_argument("--peer-model", default=None, help="model name to send to --peer-url servers")
    g.add_argument("--peer-api-key", default=None, help="bearer token for --peer-url servers")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench-out", help="directory for report.md and plots (default ./bench-out)")
    g.add_argument("--json", default=None, metavar="PATH")
    g.add_argument("--no-plots", action="store_true")
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="GGUF file, Hugging Face directory, or 'default'")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=parse_bytes("1GiB"), help="KV block pool per engine")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    add_tier_args(p)
    p.set_defaults(func=run_command)
    return p


def _list() -> int:
    from tierlm.bench.configs import CONFIGS
    from tierlm.bench.workloads import WORKLOADS, knobs_of

    print("workloads (NAME:knob=value,...):")
    for k in WORKLOADS.values():
        knobs = ", ".join(f"{n}={v}" for n, v in knobs_of(k).items())
        print(f"  {k.name:<12} {k.summary}\n  {'':<12} knobs: {knobs}")
    print("configurations:")
    for c in CONFIGS.values():
        tiers = f" [device + {' + '.join(c.tiers)}]" if c.tiers and "(device +" not in c.summary else ""
        print(f"  {c.name:<16} {c.summary}{tiers}")
    return 0


def _configs(a) -> list[str]:
    """--config/--configs as given (commas split), else every registered config except comparators run only
    when named (device-only); one that needs a Redis server (tiers-redis) only when --redis-url is given."""
    from tierlm.bench.configs import CONFIGS

    if a.config:
        return [n.strip() for v in a.config for n in v.split(",") if n.strip()]
    return [n for n, c in CONFIGS.items()
            if c.in_default and (not c.needs_server or getattr(a, "redis_url", None))]


def build_plan(a):
    from tierlm.args import tier_config
    from tierlm.bench.metrics import SLO
    from tierlm.bench.phases import PhaseShapes
    from tierlm.bench.plan import BenchPlan

    d = _QUICK if a.quick else _FULL
    pick = lambda v, k: _or(v, d[k])  # noqa: E731
    ph = d["phases"]
    phases = PhaseShapes(prefill_lens=tuple(_or(a.peer_prefill_len, ph["prefill_lens"])),
                         prompt_len=_or(a.peer_prompt_len, ph["prompt_len"]),
                         new_tokens=_or(a.peer_new_tokens, ph["new_tokens"]),
                         batches=tuple(_or(a.peer_batch, ph["batches"])), reps=ph["reps"])
    device = a.device
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    return BenchPlan(
        configs=_configs(a), workloads=list(pick(a.workload, "workloads")),
        concurrencies=list(pick(a.concurrency, "concurrency")), rate=a.rate, burstiness=a.burstiness,
        reps=pick(a.reps, "reps"), warmup=pick(a.warmup, "warmup"), seed=a.seed,
        slo=SLO(a.slo_ttft_ms, a.slo_tpot_ms, a.slo_e2e_ms), usd_per_hour=a.usd_per_hour,
        memory_budget=a.memory_budget, gate_prompts=pick(a.gate_prompts, "gate_prompts"),
        gate_tokens=pick(a.gate_tokens, "gate_tokens"), gate_long_len=pick(a.gate_long_len, "gate_long_len"),
        peer=not a.no_peer, phases=phases,
        peer_urls=list(a.peer_url), peer_model=a.peer_model,
        peer_api_key=a.peer_api_key, out_dir=Path(a.out),
        json_path=Path(a.json) if a.json else None, plots=not a.no_plots, quick=a.quick,
        model=a.model, dtype=a.dtype, device=device, max_model_len=a.max_model_len,
        kv_memory=a.kv_cache_memory, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
        tiers=tier_config(a))


def _or(value, default):
    return default if value is None else value


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_command(a) -> int:
    if a.list:
        return _list()
    if a.claims:
        return _claims(a)
    from tierlm.bench.plan import preflight

    plan = build_plan(a)
    pre = preflight(plan)  # every bad-input error is raised here, before any engine loads

    from tierlm.bench.results import BenchResult
    from tierlm.bench.runner import BenchRunner, planned_requests

    argv = getattr(a, "argv", None) or sys.argv[1:]
    result = BenchResult(command="tierlm " + " ".join(shlex.quote(x) for x in argv))
    bar = _progress(planned_requests(plan, pre))
    interrupted = False
    try:
        BenchRunner(plan, pre, result, bar).run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    return _finish(plan, result, interrupted, not a.allow_flagged)


def claims_plan(a):
    import dataclasses

    from tierlm.bench.claims import QUICK, ClaimsPlan

    d = {**dataclasses.asdict(ClaimsPlan()), **(QUICK if a.quick else {})}
    device = a.device if a.device != "auto" else ("cuda" if _cuda_available() else "cpu")
    return ClaimsPlan(
        contexts=tuple(_or(a.claims_contexts, d["contexts"])), concurrency=tuple(_or(a.concurrency, d["concurrency"])),
        new_tokens=_or(a.claims_new_tokens, d["new_tokens"]), reps=_or(a.reps, d["reps"]),
        sparse_budget=a.claims_budget, config=a.claims_config, drift_prompts=d["drift_prompts"], needles=_or(a.claims_needles, d["needles"]),
        model=a.model, dtype=a.dtype, device=device, out_dir=Path(a.out),
        json_path=Path(a.json) if a.json else None, plots=not a.no_plots, quick=a.quick)


def _claims(a) -> int:
    from tierlm.bench.claims import run_claims
    from tierlm.bench.claims_report import finish

    plan = claims_plan(a)
    plan.check()
    argv = getattr(a, "argv", None) or sys.argv[1:]
    command = "tierlm " + " ".join(shlex.quote(x) for x in argv)
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = run_claims(plan, command, progress)
    print(finish(result, plan))
    if not result.complete:
        print("tierlm bench --claims: interrupted; partial results written, marked incomplete", file=sys.stderr)
        return 130
    if result.flagged:
        print("tierlm bench --claims: v4's drift gate flagged it; its figures do not count", file=sys.stderr)
        return 0 if a.allow_flagged else 1
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, disable=None)


def _finish(plan, result, interrupted: bool, strict: bool = False) -> int:
    from tierlm.bench.headline import render_text
    from tierlm.bench.plots import write_plots
    from tierlm.bench.report import write_report

    plots, note = ([], "plots disabled (--no-plots)")
    if plan.plots:
        plots, note = write_plots(result, plan.out_dir)
        if note:
            result.notes.append(note)
    report = write_report(result, plan.out_dir, plots, note)
    if plan.json_path is not None:
        result.write_json(plan.json_path)
    color = sys.stdout.isatty()
    print(render_text(result, color=color))
    print(f"\nreport: {report}" + (f"  json: {plan.json_path}" if plan.json_path else ""))
    if interrupted:
        print("tierlm bench: interrupted; partial results written, marked incomplete", file=sys.stderr)
        return 130
    flagged = result.flagged_configs()
    if flagged:
        print(f"tierlm bench: the correctness gate flagged {', '.join(flagged)}"
              + ("" if strict else " (--allow-flagged: exit 0)"), file=sys.stderr)
    return 1 if flagged and strict else 0
