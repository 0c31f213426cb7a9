"""Engine speed on one model, side by side with transformers' generate() in the same run.

Prints prefill tok/s (one 512-token prompt), decode tok/s at batch 1 and batch 16 (128 new tokens,
greedy, EOS ignored), achieved GB/s against this machine's measured copy bandwidth, and the greedy
token diff between tierlm and the peer (a faster wrong answer is a bug).

    python -m tierlm.bench.perf [--model default] [--batch 1 16] [--new-tokens 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

from tierlm.bench.machine import measure_bandwidth
from tierlm.bench.gate import first_divergence
from tierlm.bench.phases import engine_generate, make_prompts
from tierlm.bench.transformers_peer import load_peer, run_transformers


def run_tierlm(llm, prompts: list[list[int]], new_tokens: int) -> dict:
    return engine_generate(llm.engine, prompts, new_tokens)


def diff(a: list[list[int]], b: list[list[int]]) -> dict:
    first = [first_divergence(x, y) for x, y in zip(a, b)]
    return {"prompts": len(a), "exact_match": sum(f is None for f in first),
            "first_divergence": min((f for f in first if f is not None), default=None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length for the decode runs")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="paired repetitions; the median is reported")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from tierlm import LLM

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    llm = LLM(a.model, dtype=a.dtype, device="cpu", enable_prefix_caching=False, kv_cache_memory=1 << 30,
              max_num_batched_tokens=max(512, a.prefill_len), max_num_seqs=max(a.batch))
    peer = None if a.no_peer else load_peer(a.model, dtype)
    cfg = llm.engine.model_config
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = cfg.num_params * elem
    kv_tok = llm.engine.kv_spec.bytes_per_token
    bw = measure_bandwidth()
    rows = []

    def record(name, engine, batch, plen, res_list, phase):
        med = lambda k: statistics.median(r[k] for r in res_list)  # noqa: E731
        row = {"case": name, "engine": engine, "batch": batch, "prompt_len": plen, "new_tokens": a.new_tokens}
        if phase == "prefill":
            row["prefill_tok_s"] = batch * plen / med("prefill_s")
        else:
            steps = a.new_tokens - 1
            row["decode_tok_s"] = batch * steps / med("decode_s")
            ctx = plen + a.new_tokens / 2
            step_bytes = weight_bytes + batch * ctx * kv_tok
            row["achieved_gb_s"] = step_bytes * steps / med("decode_s") / 1e9
            row["e2e_tok_s"] = batch * a.new_tokens / med("total_s")
        rows.append(row)
        return row

    def paired(prompts, new_tokens):
        """Warm both sides up, then alternate tierlm and the peer rep by rep, so a burst of load from
        elsewhere on a shared machine hits both sides rather than one."""
        run_tierlm(llm, prompts, min(new_tokens, 8))
        if peer is not None:
            run_transformers(peer, prompts, min(new_tokens, 8))
        ours, theirs = [], []
        for _ in range(a.reps):
            ours.append(run_tierlm(llm, prompts, new_tokens))
            if peer is not None:
                theirs.append(run_transformers(peer, prompts, new_tokens))
        return ours, theirs

    spreads = {}

    def spread(case, key, ours, theirs):
        if theirs:
            ratios = sorted(t[key] / o[key] for o, t in zip(ours, theirs))  # time ratio = speed ratio
            spreads[case] = (ratios[0], ratios[-1])

    # Prefill: one long prompt, one new token.
    pp = make_prompts(llm.tokenizer, 1, a.prefill_len)
    new = a.new_tokens
    a.new_tokens = 1
    ours, theirs = paired(pp, 1)
    record("prefill", "tierlm", 1, a.prefill_len, ours, "prefill")
    if theirs:
        record("prefill", "transformers", 1, a.prefill_len, theirs, "prefill")
    spread("prefill", "prefill_s", ours, theirs)
    a.new_tokens = new

    gate = []
    for b in a.batch:
        prompts = make_prompts(llm.tokenizer, b, a.prompt_len)
        ours, theirs = paired(prompts, a.new_tokens)
        record(f"decode b{b}", "tierlm", b, a.prompt_len, ours, "decode")
        if theirs:
            record(f"decode b{b}", "transformers", b, a.prompt_len, theirs, "decode")
            spread(f"decode b{b}", "decode_s", ours, theirs)
            gate.append({"batch": b, **diff(ours[0]["tokens"], theirs[0]["tokens"])})

    print(f"\nmodel {cfg.model_id}, {a.dtype}, {torch.get_num_threads()} threads; "
          f"weights {weight_bytes / 1e6:.0f} MB; KV {kv_tok} B/token; measured copy bandwidth {bw:.1f} GB/s")
    print(f"{'case':<12} {'engine':<13} {'tok/s':>9} {'vs peer':>8} {'GB/s':>7} {'% of bw':>8}  per-rep ratio range")
    by = {(r["case"], r["engine"]): r for r in rows}
    for r in rows:
        key = "prefill_tok_s" if "prefill_tok_s" in r else "decode_tok_s"
        peer_row = by.get((r["case"], "transformers"))
        ratio = f"{r[key] / peer_row[key]:.2f}x" if peer_row and r["engine"] == "tierlm" else ""
        gbs = f"{r['achieved_gb_s']:.1f}" if "achieved_gb_s" in r else ""
        pct = f"{100 * r['achieved_gb_s'] / bw:.0f}%" if "achieved_gb_s" in r else ""
        rng = spreads.get(r["case"]) if r["engine"] == "tierlm" else None
        rng = f"  {rng[0]:.2f}x - {rng[1]:.2f}x" if rng else ""
        print(f"{r['case']:<12} {r['engine']:<13} {r[key]:>9.1f} {ratio:>8} {gbs:>7} {pct:>8}{rng}")
    for g in gate:
        flag = "OK" if g["exact_match"] == g["prompts"] else "DIVERGED"
        print(f"greedy diff vs transformers, batch {g['batch']}: {g['exact_match']}/{g['prompts']} exact "
              f"(first divergence at token {g['first_divergence']}) {flag}")
    if a.json:
        env = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "bandwidth_gb_s": bw}
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "correctness": gate,
                       "ratio_range": {k: list(v) for k, v in spreads.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
