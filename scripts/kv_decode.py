"""Decode speed by KV format at long contexts: the FP8 decode target of the FP8-KV work (>= 1.5x fp32 at 8K
on CPU), with fp32 and bf16 in the same run. Default model, one process, sides alternating rep by rep.

    .venv/bin/python scripts/kv_decode.py [--contexts 4096 8192] [--batch 8] [--formats fp32 bf16 fp8_e4m3]
                                          [--steps 16] [--reps 3] [--json out.json]

A side may add sparse decoding with a block selector (quest or index): `fp8_e4m3+quest:1024` reads 1,024 KV
tokens per sequence in every sparse layer (the first two layers stay dense); its bytes per step count what it reads.
A sparse side may also spill (kvcache/spill.py): `fp8_e4m3+quest:1024+spill:12288:8192` gives the device
12,288 KV tokens in all, 8,192 of them staging (default: batch x budget; none on the cpu backend, which reads
spilled blocks in place), and spills the rest of the contexts to host memory; the row gives each side's
device KV bytes (selector metadata included, a row per spill slot too) and the spill store's counters.

For each context C, one engine per format (prefix caching off, the engine's default attention backend for
that format: on CPU `cpu` for fp32 and FP8 (native in-place decode kernels), `torch` for bf16, which the
native kernels do not read), each holding `batch` running sequences of C - 1 prompt tokens (distinct
passages of the shipped public-domain text; prefilled untimed). Then, rep by rep, each side in turn
(rotating order) runs `steps` decode steps at batch `batch` (every step checked to be decode-only at that
batch); a row gives each side's median ms per step and
decode tok/s, and each format / fp32 as the median of the per-rep ratios (each rep's sides ran back to
back) with min and max. Bytes per step = weights read + batch x (context x KV bytes/token + the selector
metadata a sparse side scans), so the table also says how many bytes each format moves. After timing, every side's greedy tokens are diffed against
fp32's over the tokens both made (FP8 is lossy: a divergence is reported, not an error). The context is
C minus a headroom for the tokens sequences make while the others prefill (the table says the exact one).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tierlm.bench.memory import weight_bytes
from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig, SparseConfig
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.llm_engine import LLMEngine
from tierlm.kvcache import KVSpec
from tierlm.models.loader import load_checkpoint

TEXT = (Path(__file__).parents[1] / "src/tierlm/bench/data/midsummer_act1.txt").read_text()


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    while len(ids) < length + 64 * n:
        ids = ids + ids
    return [ids[64 * i: 64 * i + length] for i in range(n)]  # distinct windows (no shared prefix)


def step(eng: LLMEngine, done: dict[str, list[int]]) -> None:
    for out in eng.step():
        if out.finished:
            done[out.request_id] = list(out.outputs[0].token_ids)


def build(side: str, blocks: int, batch: int, dense_layers: int = 2) -> LLMEngine:
    """A side "FORMAT", "FORMAT+SELECTOR:BUDGET" or "FORMAT+SELECTOR:BUDGET+spill:DEVICE_TOKENS[:STAGING_TOKENS]"
    (SELECTOR: quest or index)."""
    side, _, spill = side.partition("+spill:")
    fmt, _, chosen = side.partition("+")
    selector, _, budget = chosen.partition(":")
    sparse = SparseConfig(selector=selector, budget_tokens=int(budget), dense_layers=dense_layers) if budget else SparseConfig()
    if spill:
        device, _, staging = spill.partition(":")
        spill_blocks = blocks  # room for every context off the device
        blocks = int(device) // 16
        # room for every context's blocks, no more: each spill slot also keeps its selector metadata on the device
        page = KVSpec.from_model(load_checkpoint(None).config, fmt, 16).page_size_bytes
        sparse = SparseConfig(selector=selector, budget_tokens=int(budget), dense_layers=dense_layers,
                              staging_tokens=int(staging) if staging else batch * int(budget),
                              spill_bytes=spill_blocks * page)
    return LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=blocks, kv_format=fmt, enable_prefix_caching=False),
                                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
                                  sparse=sparse))


def kv_tokens_read(eng: LLMEngine, ctx: int) -> float:
    """KV tokens one decode step reads per sequence, averaged over the layers (sparse layers read the budget)."""
    sp, layers = eng.config.sparse, eng.model_config.num_layers
    if not sp.enabled:
        return ctx
    dense = min(sp.dense_layers, layers)
    return (dense * ctx + (layers - dense) * min(ctx, sp.budget_tokens)) / layers


def meta_bytes_read(eng: LLMEngine, ctx: int) -> int:
    """Selector metadata one decode step reads per sequence: every block's (Quest's bounds, the index keys)
    in each sparse layer of a context past the budget."""
    sp, layers = eng.config.sparse, eng.model_config.num_layers
    if not sp.enabled or ctx <= sp.budget_tokens:
        return 0
    layer = eng.kv_storage.layers[-1]
    per_block = sum(t[0].numel() * t.element_size() for t in layer.block_meta.values())
    return (layers - min(sp.dense_layers, layers)) * -(-ctx // eng.kv_spec.block_size) * per_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "fp8_e4m3"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sparse-dense-layers", type=int, default=2, help="layers sparse sides read whole (default 2)")
    a = ap.parse_args()
    rows = []
    for ctx in a.contexts:
        # Sequences get their first token at different steps (prefill is chunked, 512 tokens a step) and
        # decode while the others prefill, so each may make up to batch x chunks-per-prompt tokens before
        # timing starts: that is the headroom max_tokens (and the context cap) leaves.
        new = a.batch * -(-ctx // 512) + 2 + a.steps * a.reps
        blocks = a.batch * -(-(ctx + new) // 16) + 4
        sides: dict[str, LLMEngine] = {}
        done: dict[str, dict[str, list[int]]] = {}
        for fmt in a.formats:
            eng = build(fmt, blocks, a.batch, a.sparse_dense_layers)
            ctx_eff = min(ctx, eng.max_model_len - new) - 1
            t0 = time.perf_counter()
            done[fmt] = {}
            for i, p in enumerate(prompts(eng.tokenizer, a.batch, ctx_eff)):
                eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True), request_id=str(i))
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running + list(eng.scheduler.waiting)):
                step(eng, done[fmt])  # prefill (untimed): until every sequence decodes
            step(eng, done[fmt])  # first decode step (warm)
            print(f"{ctx_eff}-token context, {fmt}: {a.batch} sequences prefilled in {time.perf_counter() - t0:.0f} s "
                  f"({eng.attention_backend.name} backend, {eng.kv_spec.bytes_per_token:,} KV bytes/token)", flush=True)
            sides[fmt] = eng
        times: dict[str, list[float]] = {f: [] for f in sides}
        names = list(sides)
        for rep in range(a.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for fmt in order:
                eng = sides[fmt]
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step(eng, done[fmt])
                    s = eng.last_step
                    assert s.decode_tokens == a.batch and s.prefill_tokens == 0, (fmt, s)
                times[fmt].append((time.perf_counter() - t0) / a.steps)
        for fmt, eng in sides.items():  # the tokens so far, then stop (the headroom is not needed)
            for rid, group in list(eng.groups.items()):
                done[fmt][rid] = list(group.seqs[0].request.output_token_ids)
                eng.abort_request(rid)
        base = names[0]
        for fmt in names:
            eng = sides[fmt]
            n = min(len(t) for t in [*done[fmt].values(), *done[base].values()])  # same length on both sides
            same = sum(done[fmt][i][:n] == done[base][i][:n] for i in done[base])
            ms = statistics.median(times[fmt]) * 1e3
            ratios = [b / t for b, t in zip(times[base], times[fmt])]
            w = weight_bytes(eng.model)[1]
            moved = w + a.batch * (kv_tokens_read(eng, ctx_eff) * eng.kv_spec.bytes_per_token
                                   + meta_bytes_read(eng, ctx_eff))
            row = {"context": ctx_eff, "batch": a.batch, "kv_format": fmt, "backend": eng.attention_backend.name,
                   "ms_per_step": ms, "decode_tok_s": a.batch / (ms / 1e3), f"speedup_vs_{base}": statistics.median(ratios),
                   "speedup_min": min(ratios), "speedup_max": max(ratios), "bytes_per_step": moved,
                   "kv_bytes_per_token": eng.kv_spec.bytes_per_token, f"greedy_same_as_{base}": same,
                   "device_kv_bytes": eng.kv_storage.nbytes,
                   "spill": eng.spill.stats() if eng.spill is not None else None}
            rows.append(row)
            print(f"  {fmt:<16} {eng.attention_backend.name:<6} {ms:8.1f} ms/step  {row['decode_tok_s']:7.1f} tok/s  "
                  f"x{row[f'speedup_vs_{base}']:.2f} vs {base} [{min(ratios):.2f}..{max(ratios):.2f}]  "
                  f"{moved / 2**20:8.1f} MiB/step  greedy {same}/{len(done[base])} same as {base}  "
                  f"device KV {eng.kv_storage.nbytes / 2**20:.0f} MiB", flush=True)
            twin = fmt.partition("+spill:")[0]
            if eng.spill is not None and twin in done:  # the same side with every block on the device
                m = min(len(t) for t in [*done[fmt].values(), *done[twin].values()])
                row[f"greedy_same_as_{twin}"] = sum(done[fmt][i][:m] == done[twin][i][:m] for i in done[twin])
                print(f"    greedy {row[f'greedy_same_as_{twin}']}/{len(done[twin])} same as {twin} (all on the device)",
                      flush=True)
            if eng.spill is not None:
                print(f"    spill: {row['spill']}", flush=True)
        sides.clear()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
