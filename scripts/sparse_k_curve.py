"""The sparse budget k against quality and speed: for each k, top-1 agreement and KL against dense fp32 (the
reference's greedy continuations teacher-forced through the sparse engine: decode steps, so the picks count)
and decode throughput at batch `batch` (all sides in one process, taking turns rep by rep), as a table, JSON
and a PNG with two panels.

    .venv/bin/python scripts/sparse_k_curve.py [--context 4096] [--kv-format fp8_e4m3] [--selector quest|index] [--ks 256 512 1024 2048 4096]
                                               [--batch 8] [--prompts 6] [--new-tokens 32] [--steps 8] [--reps 2]
                                               [--out sparse-k.png] [--json sparse-k.json]

The prompts are distinct windows of the shipped public-domain text (bench.claims.PromptSource). k >= context
reads every block (sparse is then exactly dense in that KV format), so the last point is the format's own
drift. Speed: one engine per k holding `batch` sequences of `context - steps * reps - 8 - headroom` tokens
(prefilled untimed; bench.claims.headroom: the tokens early sequences make while the others prefill), `steps` decode steps per rep; the ratio is against dense fp32 measured the same way in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tierlm.bench.claims import PromptSource, headroom
from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig, SparseConfig
from tierlm.core.sampling_params import SamplingParams
from tierlm.drift.metrics import kl_divergence, top1_matches
from tierlm.engine.llm import LLM
from tierlm.engine.llm_engine import LLMEngine


def engine(fmt: str, k: int | None, seqs: int, context: int, selector: str = "quest") -> LLMEngine:
    sparse = SparseConfig(selector=selector, budget_tokens=k) if k else SparseConfig()
    return LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=seqs * (context // 16 + 2) + 4, kv_format=fmt,
                                                    enable_prefix_caching=False),
                                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512), sparse=sparse))


def greedy(eng: LLMEngine, prompts: list[list[int]], new: int) -> list[list[int]]:
    replies = LLM.for_engine(eng).generate(prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
    return [list(r.outputs[0].token_ids) for r in replies]


def quality(a, ks: list[int | None]) -> dict:
    ref = engine("fp32", None, a.prompts, a.context)
    prompts = PromptSource(ref.tokenizer, a.context, 64).take(a.prompts, a.context - a.new_tokens)
    tokens = greedy(ref, prompts, a.new_tokens)
    base = ref.score(prompts, tokens)
    del ref
    out = {}
    for k in ks:
        eng = engine(a.kv_format, k, a.prompts, a.context, a.selector)
        logits = eng.score(prompts, tokens)
        kl = torch.cat([kl_divergence(x, y) for x, y in zip(base, logits)])
        agree = torch.cat([top1_matches(x, y) for x, y in zip(base, logits)]).double()
        out[k] = {"top1_agreement": float(agree.mean()), "kl_mean": float(kl.mean()),
                  "kl_p99": float(torch.quantile(kl, 0.99)), "positions": int(kl.numel())}
        print(f"quality k={k}: top-1 {out[k]['top1_agreement']:.3f} KL {out[k]['kl_mean']:.4f}", flush=True)
        del eng
    return out


def speed(a, ks: list[int | None]) -> dict:
    ctx = a.context - a.steps * a.reps - 8
    ctx -= headroom(a.batch, ctx)
    sides: dict = {}
    for k in [None, *ks]:
        fmt = "fp32" if k is None else a.kv_format
        eng = engine(fmt, k, a.batch, a.context, a.selector)
        prompts = PromptSource(eng.tokenizer, ctx, 64).take(a.batch, ctx)
        for p in prompts:  # headroom: tokens early sequences make while the others prefill
            eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=a.steps * a.reps + 4 + headroom(a.batch, ctx),
                                              ignore_eos=True))
        while any(r.num_computed_tokens < r.num_prompt_tokens
                  for r in eng.scheduler.running + list(eng.scheduler.waiting)):
            eng.step()
        eng.step()
        sides["dense-fp32" if k is None else k] = eng
    times: dict = {name: [] for name in sides}
    names = list(sides)
    for rep in range(a.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            eng = sides[name]
            t0 = time.perf_counter()
            for _ in range(a.steps):
                eng.step()
                assert eng.last_step.decode_tokens == a.batch and eng.last_step.prefill_tokens == 0
            times[name].append((time.perf_counter() - t0) / a.steps)
    out = {}
    for name in names:
        ratios = [b / t for b, t in zip(times["dense-fp32"], times[name])]
        out[name] = {"ms_per_step": statistics.median(times[name]) * 1e3, "speedup_vs_dense_fp32": statistics.median(ratios),
                     "speedup_range": [min(ratios), max(ratios)]}
        print(f"speed {name}: {out[name]['ms_per_step']:.1f} ms/step x{out[name]['speedup_vs_dense_fp32']:.2f}", flush=True)
    return out


def plot(rows: list[dict], context: int, kv_format: str, selector: str, batch: int, out: str) -> None:
    """Two panels: top-1 agreement and decode speed-up against k (log axis, ticks at the measured k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ks = [r["k"] for r in rows]
    ax1.plot(ks, [r["top1_agreement"] for r in rows], "o-")
    ax1.axhline(0.95, ls="--", c="gray", label="gate 0.95")
    ax1.set(ylabel="top-1 agreement vs dense fp32", title=f"quality at {context} tokens ({kv_format} + {selector})")
    ax2.plot(ks, [r["speedup_vs_dense_fp32"] for r in rows], "o-")
    ax2.axhline(1.8, ls="--", c="gray", label="claim 1.8x")
    ax2.set(ylabel="decode speed-up vs dense fp32", title=f"decode, batch {batch}")
    for ax in (ax1, ax2):
        ax.set(xscale="log", xlabel="budget k (tokens)")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--kv-format", default="fp8_e4m3")
    ap.add_argument("--selector", default="quest", choices=["quest", "index"], help="block selector (default quest)")
    ap.add_argument("--ks", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="sparse-k.png")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    q = quality(a, a.ks)
    s = speed(a, a.ks)
    rows = [{"k": k, **q[k], **s[k]} for k in a.ks]
    print(f"\ncontext {a.context}, {a.kv_format} + {a.selector}, batch {a.batch}; vs dense fp32 in the same run")
    print("| k | top-1 agreement | KL mean | decode ms/step | speed-up vs dense fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['top1_agreement']:.3f} | {r['kl_mean']:.4f} | {r['ms_per_step']:.1f} | "
              f"{r['speedup_vs_dense_fp32']:.2f}x [{r['speedup_range'][0]:.2f}..{r['speedup_range'][1]:.2f}] |")
    plot(rows, a.context, a.kv_format, a.selector, a.batch, a.out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"context": a.context, "kv_format": a.kv_format, "selector": a.selector, "batch": a.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
