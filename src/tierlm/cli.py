"""`tierlm` entry point: parses arguments and dispatches. User errors: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import sys
import time

from tierlm.args import add_engine_args, add_tier_args, engine_config, format_bytes, parse_bytes
from tierlm.core.errors import TierlmError
from tierlm.core.registry import KV_FORMATS


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], dest="stop_token_ids")
    g.add_argument("--logprobs", type=int, default=None, help="also return the top-N logprobs per token")
    g.add_argument("--ignore-eos", action="store_true")


def _sampling(a):
    from tierlm.core.sampling_params import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                          seed=a.seed, stop=a.stop, stop_token_ids=a.stop_token_ids, logprobs=a.logprobs,
                          ignore_eos=a.ignore_eos)


def _llm(a):
    from tierlm.engine.llm import LLM

    return LLM.from_config(engine_config(a))


def _write_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def cached_by_tier(engine, out) -> dict[str, int]:
    """Cached prompt tokens by where they came from: the device and every configured tier, 0 when none."""
    split = {"device": 0, **{name: 0 for name in engine.tier_stats()}}
    for name, n in (out.cached_tokens_by_tier or {}).items():
        split[name] = split.get(name, 0) + n
    return split


def tier_lines(tier_stats: dict[str, dict]) -> list[str]:
    """One line per lower tier: hits, traffic, use and health."""
    lines = []
    for name, t in tier_stats.items():
        cap = t.get("capacity_bytes") or 0
        pct = f" ({100 * t.get('used_bytes', 0) / cap:.1f}%)" if cap else ""
        lines.append(f"{name}: hits {t.get('hit_tokens', 0)} tokens ({t.get('found', 0)}/{t.get('lookups', 0)} blocks "
                     f"found), loaded {format_bytes(t.get('bytes_loaded', 0))}, stored "
                     f"{format_bytes(t.get('bytes_stored', 0))}, used {format_bytes(t.get('used_bytes', 0))} / "
                     f"{format_bytes(cap)}{pct} in {t.get('entries', 0)} entries, evictions {t.get('evictions', 0)}, "
                     f"errors {t.get('errors', 0)}, corrupt {t.get('corrupt', 0)}, "
                     f"{'healthy' if t.get('healthy', True) else 'UNHEALTHY'}")
    return lines


def cmd_generate(a) -> int:
    params = _sampling(a)  # validate before the model loads
    llm = _llm(a)
    try:
        return _generate(a, llm, params)
    finally:
        llm.engine.close()  # queued disk/Redis writes land before the process exits


def _generate(a, llm, params) -> int:
    prompt = llm.apply_chat_template([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    t0 = time.perf_counter()
    first = None
    printed = 0
    out = None
    for out in llm.stream(prompt, params):
        if first is None:
            first = time.perf_counter()
        text = out.outputs[0].text
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    c = out.outputs[0]
    by_tier = cached_by_tier(llm.engine, out)
    if (a.stats or a.json) and llm.engine.tiers is not None:
        llm.engine.tiers.flush(timeout=30.0)  # the tier counters then include this run's queued writes
    if a.stats:
        n_out = len(c.token_ids)
        ttft = (first - t0) if first else float("nan")
        decode_rate = (n_out - 1) / (t1 - first) if first and n_out > 1 and t1 > first else float("nan")
        print(f"[stats] prompt_tokens={len(out.prompt_token_ids)} cached_tokens={out.num_cached_tokens} "
              f"output_tokens={n_out} finish_reason={c.finish_reason} load_s={llm.engine.load_seconds:.2f} "
              f"ttft_ms={ttft * 1e3:.1f} decode_tok_s={decode_rate:.1f} total_s={t1 - t0:.2f}", file=sys.stderr)
        print("[stats] cached: " + ", ".join(f"{name} {n}" for name, n in by_tier.items()), file=sys.stderr)
        for line in tier_lines(llm.engine.tier_stats()):
            print(f"[stats] tier {line}", file=sys.stderr)
    result = {"prompt": a.prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
              "prompt_tokens": len(out.prompt_token_ids), "cached_tokens": out.num_cached_tokens,
              "cached_tokens_by_tier": by_tier}
    if llm.engine.tiers is not None:
        result["tiers"] = llm.engine.tier_stats()
    _write_json(a.json, result)
    return 0


def cmd_chat(a) -> int:
    params = _sampling(a)
    llm = _llm(a)
    try:
        return _chat(a, llm, params)
    finally:
        llm.engine.close()  # queued disk/Redis writes land before the process exits


def _chat(a, llm, params) -> int:
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("tierlm chat: empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        printed, text = 0, ""
        for out in llm.stream(llm.apply_chat_template(messages), params):
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": text})
    return 0


def _engram_info(ckpt) -> dict:
    """A V4-mini's Engram tables: where they are, their shape and bytes, and the per-token state the KV carries."""
    from tierlm.kvcache.spec import engram_state_bytes
    from tierlm.memory.hashing import layer_hasher
    from tierlm.models.v4mini import table_name

    c, e = ckpt.config, ckpt.config.engram
    tables = [ckpt.weights[table_name(i)] for i in e.layers]
    return {"layers": list(e.layers), "orders": list(e.orders), "heads": e.heads, "row_dim": e.row_dim,
            "rows": sum(layer_hasher(e, i, c.vocab_size).total_rows for i in e.layers),
            "table_bytes": sum(t.numel() * t.element_size() for t in tables),
            "table_file": str(ckpt.table_files[0]) if ckpt.table_files else None, "conv": e.conv,
            "normalized_ids": e.num_ids or None, "state_bytes_per_token": engram_state_bytes(c)}


def cmd_info(a) -> int:
    from tierlm.config import CacheConfig
    from tierlm.kernels import cpu as cpu_kernels
    from tierlm.kvcache.spec import KV_FORMAT_REGISTRY, KVSpec
    from tierlm.models.loader import load_checkpoint

    ckpt = load_checkpoint(a.model)
    c = ckpt.config
    CacheConfig(block_size=a.block_size)  # validates
    budget = a.memory
    formats = []
    for name, fmt in KV_FORMAT_REGISTRY.items():
        if fmt.scale_group and c.head_dim % fmt.scale_group:
            continue  # a scale group wider than (or not dividing) this model's heads: not a format it can use
        spec = KVSpec.from_model(c, name, a.block_size)
        formats.append({"kv_format": name, "implemented": fmt.implemented, "bytes_per_token": spec.bytes_per_token,
                        "bytes_per_session": spec.bytes_per_token * a.seq_len,
                        "max_sessions_at_budget": spec.max_sessions(budget, a.seq_len),
                        "scales": _scale_note(fmt)})
    info = {"model_id": c.model_id, "architecture": c.architecture, "source": str(ckpt.path),
            "parameters": c.num_params, "layers": c.num_layers, "hidden_size": c.hidden_size,
            "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "context_length": c.max_position_embeddings, "tied_embeddings": c.tie_word_embeddings,
            "block_size": a.block_size, "seq_len": a.seq_len, "memory_budget_bytes": budget, "kv_formats": formats,
            "cpu_kernels": cpu_kernels.status()}
    print(f"{c.model_id} ({c.architecture}): {c.num_params / 1e6:.1f}M parameters, {c.num_layers} layers, "
          f"hidden {c.hidden_size}, {c.num_heads} query / {c.num_kv_heads} KV heads x {c.head_dim}, "
          f"vocab {c.vocab_size}, context {c.max_position_embeddings}")
    print(f"KV cache, sessions of {a.seq_len} tokens in a {budget / 2**30:.2f} GiB budget (block size {a.block_size}):")
    w = max(len(f["kv_format"]) for f in formats)
    print(f"  {'format':<{w}} {'bytes/token':>12} {'vs fp32':>8} {'MiB/session':>12} {'max sessions':>13}  scales")
    fp32 = next(f["bytes_per_token"] for f in formats if f["kv_format"] == "fp32")
    for f in formats:
        note = "" if f["implemented"] else "  (planned)"
        print(f"  {f['kv_format']:<{w}} {f['bytes_per_token']:>12,} {f['bytes_per_token'] / fp32:>8.3f} "
              f"{f['bytes_per_session'] / 2**20:>12.2f} {f['max_sessions_at_budget']:>13,}  {f['scales']}{note}")
    tiers = _tier_capacities(a, c)
    info["tier_kv_format"] = tiers["kv_format"]
    info["tiers"] = tiers["tiers"]
    spec_bpt = tiers["bytes_per_token"]
    print(f"KV tiers in {tiers['kv_format']} ({spec_bpt:,} bytes/token), sessions of {a.seq_len} tokens "
          f"(block size {a.block_size}):")
    print(f"  {'tier':<7} {'capacity':>12} {'tokens':>14} {'sessions':>10}")
    for t in tiers["tiers"]:
        where = f"  ({t['location']})" if t.get("location") else ""
        print(f"  {t['tier']:<7} {format_bytes(t['capacity_bytes']):>12} {t['tokens']:>14,} {t['sessions']:>10,}{where}")
    from tierlm.models.loader.quantized import weight_bytes_by_format

    info["weights"] = weight_bytes_by_format(ckpt)
    fp32_total = info["weights"][0]["total"]
    print("Weights by --quantization format (linears + embedding + norms; 'as stored': the GGUF holds these blocks):")
    print(f"  {'format':<7} {'linears':>10} {'embedding':>10} {'total':>10} {'vs fp32':>8}")
    for r in info["weights"]:
        note = "  as stored" if r["as_stored"] else ""
        print(f"  {r['format']:<7} {format_bytes(r['linears']):>10} {format_bytes(r['embedding']):>10} "
              f"{format_bytes(r['total']):>10} {r['total'] / fp32_total:>8.3f}{note}")
    if c.engram is not None:
        info["engram"] = _engram_info(ckpt)
        e = info["engram"]
        print(f"Engram memory before layers {', '.join(map(str, e['layers']))}: {'/'.join(map(str, e['orders']))}-grams "
              f"x {e['heads']} hash heads, {e['rows']:,} rows x {e['row_dim']} values "
              f"({format_bytes(e['table_bytes'])} of tables, {e['table_file']}), conv state "
              f"{e['state_bytes_per_token']:,} bytes/token (in the KV figures above); served from --engram-backend "
              "device | host | mmap")
    k = info["cpu_kernels"]
    print("CPU kernels (fp32 decode attention, add + RMSNorm): "
          + (f"native ({k['library']})" if k["native"] else f"PyTorch paths ({k['reason']})"))
    _write_json(a.json, info)
    return 0


def _scale_note(fmt) -> str:
    if not fmt.scaled:
        return "-"
    if fmt.static:
        return "static: fp32 per layer, K/V and head (tierlm calibrate)"
    per = f"per {fmt.scale_group} values" if fmt.scale_group else "per head"
    return f"{'UE8M0' if fmt.scale_bytes == 1 else 'fp32'} per token, {per}"


def cmd_calibrate(a) -> int:
    """Record per-layer, per-head K/V amax on the prompts in --data and write the static-scale file."""
    from pathlib import Path

    from tierlm.config import CacheConfig, EngineConfig
    from tierlm.core.sampling_params import SamplingParams
    from tierlm.engine.llm_engine import LLMEngine
    from tierlm.quant.calibration import AmaxRecorder, KVScales, ModelIdentity, default_path, read_prompts

    prompts = read_prompts(Path(a.data))[: a.max_prompts]
    model = None if a.model in (None, "", "default") else a.model
    engine = LLMEngine(EngineConfig(model=model, dtype=a.dtype, device=a.device,
                                    cache=CacheConfig(kv_format=None, enable_prefix_caching=False)))
    recorder = AmaxRecorder(engine.runner.backend, engine.kv_storage)
    engine.runner.backend = recorder
    limit = min(a.max_prompt_tokens, engine.max_model_len - a.max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for text in prompts:
        ids = engine.tokenizer.encode(text)[:limit]
        if ids:
            engine.add_request(ids, params)
    while engine.has_unfinished_requests():
        engine.step()
    identity = ModelIdentity(engine.model_config.model_id, engine.weights_digest, engine.model_config_digest)
    scales = KVScales(identity, recorder.amax.clone(), recorder.tokens, source=str(a.data), margin=a.margin)
    path = scales.save(Path(a.out) if a.out else default_path(identity))
    amax = recorder.amax
    print(f"calibrated {identity.model_id} on {len(prompts)} prompts ({recorder.tokens:,} tokens) in "
          f"{time.perf_counter() - t0:.1f} s: |K| max {amax[:, 0].max():.2f} (median over layers and heads "
          f"{amax[:, 0].median():.2f}), |V| max {amax[:, 1].max():.2f} (median {amax[:, 1].median():.2f})")
    print(f"wrote {path}; use it with --kv-format fp8_e4m3_static (or fp8_e5m2_static)")
    _write_json(a.json, {"path": str(path), "model_id": identity.model_id, "prompts": len(prompts),
                         "tokens": recorder.tokens, "digest": scales.digest, "amax": amax.tolist()})
    return 0


def _tier_capacities(a, model_config) -> dict:
    """What the device pool (--memory) and each tier the flags name would hold, by arithmetic only (no tier is
    opened or contacted). Tokens: capacity // bytes per token; sessions: whole blocks (KVSpec.max_sessions)."""
    from tierlm.config import TierConfig
    from tierlm.kvcache.spec import KVSpec

    kv_format = a.kv_format
    if kv_format == "auto":  # what the engine picks on --device auto: bf16 on CUDA, fp32 on CPU
        import torch

        kv_format = "bf16" if torch.cuda.is_available() else "fp32"
    spec = KVSpec.from_model(model_config, kv_format, a.block_size)
    defaults = TierConfig()
    rows = [("device", a.memory, None)]
    if a.host_cache_memory:
        rows.append(("host", a.host_cache_memory, None))
    if a.disk_cache_dir or a.disk_cache_size is not None:
        rows.append(("disk", a.disk_cache_size or defaults.disk_bytes, a.disk_cache_dir))
    if a.redis_url or a.redis_cache_size is not None:
        rows.append(("redis", a.redis_cache_size or defaults.redis_bytes, a.redis_url))
    tiers = []
    for name, cap, location in rows:
        row = {"tier": name, "capacity_bytes": cap, "tokens": cap // spec.bytes_per_token,
               "sessions": spec.max_sessions(cap, a.seq_len)}
        if location:
            row["location"] = location
        tiers.append(row)
    return {"kv_format": kv_format, "bytes_per_token": spec.bytes_per_token, "tiers": tiers}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierlm", description="LLM inference built around the memory hierarchy.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt (streams to stdout)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stats", action="store_true", help="print prompt/cached tokens (by tier), timings and each KV tier's counters after the text")
    g.add_argument("--json", default=None, metavar="PATH")
    add_engine_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat, max_tokens=256)

    i = sub.add_parser("info", help="model shape, KV bytes/token per format, sessions that fit a budget")
    i.add_argument("--model", default=None)
    i.add_argument("--block-size", type=int, default=16)
    i.add_argument("--seq-len", type=int, default=4096, help="session length for the capacity figure")
    i.add_argument("--memory", type=parse_bytes, default=parse_bytes("8GiB"), help="KV memory budget, e.g. 8GiB")
    i.add_argument("--kv-format", default="auto", choices=["auto", *KV_FORMATS],
                   help="KV format of the tier capacity table (auto: bf16 with CUDA, else fp32, as the engine picks)")
    add_tier_args(i, sizes_only=True)
    i.set_defaults(disk_cache_size=None, redis_cache_size=None)  # a size given alone still shows its tier
    i.add_argument("--json", default=None, metavar="PATH")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("calibrate", help="record per-layer/per-head K/V maxima for static FP8 KV scales")
    k.add_argument("--model", default=None)
    k.add_argument("--data", required=True, help=".txt (paragraphs split on blank lines) or .jsonl ({\"prompt\": ...})")
    k.add_argument("--out", default=None, metavar="PATH", help="where to write (default: next to the cached model)")
    k.add_argument("--max-prompts", type=int, default=256)
    k.add_argument("--max-prompt-tokens", type=int, default=2048, help="prompts are cut to this many tokens")
    k.add_argument("--max-tokens", type=int, default=16, help="greedy tokens generated per prompt (decode K/V too)")
    k.add_argument("--margin", type=float, default=1.0, help="scale = amax * margin / fmax (headroom above amax)")
    k.add_argument("--dtype", default="auto")
    k.add_argument("--device", default="auto")
    k.add_argument("--json", default=None, metavar="PATH")
    k.set_defaults(func=cmd_calibrate)

    from tierlm.bench.command import add_parser as add_bench_parser
    from tierlm.drift.command import add_parser as add_drift_parser
    from tierlm.cluster.command import add_parser as add_serve_parser
    from tierlm.synth.command import add_parser as add_synth_parser
    from tierlm.train.command import add_parser as add_train_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_drift_parser(sub)
    add_train_parser(sub)
    add_synth_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TierlmError as e:
        print(f"tierlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tierlm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if getattr(e, "filename", None):
            print(f"tierlm: error: {e.strerror}: {e.filename} (check the path and permissions)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
