"""Engine speed on one model, side by side with transformers' generate() in the same run: a command over
`phases.measure_paired` (definitions and the rep pairing are stated there).

    python -m tierlm.bench.perf [--model default] [--device cpu|cuda] [--dtype fp32|bf16]
                                [--prefill-len 512 1024 2048 4096 8192] [--batch 1 16] [--prompt-len 32]
                                [--new-tokens 128] [--reps 3] [--attention-backend auto|cpu|torch|triton]
                                [--kv-format F] [--enforce-eager] [--sparse-budget TOKENS]
                                [--variant NAME:key=value,...]...
                                [--no-peer] [--peer-cache static|dynamic] [--peer-compile] [--no-reference]
                                [--progress] [--json out.json]
                                [--quantization q4_1 [--quant-activations int16] [--baseline]]
                                [--llama-server http://127.0.0.1:8090]

Rows: prefill tok/s for each --prefill-len (one prompt, one new token; the recompute baseline every later
technique is measured against), then decode and e2e tok/s for each --batch (greedy, EOS ignored). Decode
rows also give achieved GB/s = (weight bytes + batch x mean context x KV bytes/token) per step x steps/s,
against this machine's measured copy bandwidth (the GPU's own device-to-device copy with --device cuda).
Then the greedy token diff tierlm vs transformers per batch (a faster wrong answer is a bug).

The engine runs as users run it: no prefix cache (every rep recomputes), chunked prefill at the engine
default of 512 tokens a step (long prompts take several steps), a KV pool sized for the longest prefill and
the largest decode batch. A prefill length at or above the model's context is capped at context - 1
(prompt + one new token must fit) and the run says so. --attention-backend torch reproduces the older
gather + mask prefill path, for before/after figures. Both sides run on --device; on CUDA, transformers
runs eagerly (its generate() auto-compile is off unless --peer-compile) and every timing synchronizes.

With --dtype other than fp32, the tierlm-vs-transformers diff alone misleads: both sides round, and a
divergence may be either side's. So after the timed runs (the bf16 engine and peer freed first) a tierlm
engine in fp32 on the same device, the reference config, generates the same decode prompts greedily, and
each batch also reports tierlm vs that reference and transformers vs that reference (--no-reference skips
it). In fp32 runs tierlm is the reference itself and only the tierlm-vs-transformers diff is reported.

Quantized weights and llama.cpp: --quantization runs the tierlm side on that weight format (--quant-activations
as the engine flag); --baseline adds the unquantized engine as a side of its own ("tierlm-fp32"), so the
speed-up is paired in the same run; --llama-server URL adds llama.cpp's server (scripts/llama_server.sh serve,
same GGUF, same threads) as a side, driven over HTTP through its native /completion endpoint with the same token
ids. Every other side's column gets a "tierlm / side" ratio, and its decode tokens are diffed against tierlm's.

Variants (--variant NAME:key=value,...): more tierlm engines in the same paired run, each the tierlm side with some
settings changed (attention backend, KV format, eager vs captured decode, Quest sparse budget, weight format): e.g.
captured vs eager decode, or dense bf16 vs FP8 KV vs FP8 + sparse at a long --prompt-len. Achieved GB/s counts each
side's own weight and KV bytes (a sparse side is credited with its whole context: an upper bound on what it read).

--model takes the default model, a .gguf file or a Hugging Face directory (e.g. random weights in the
default model's shape: python tests/helpers/random_model.py OUT --like CONFIG_DIR).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys

import torch

from tierlm.bench.gate import first_divergence
from tierlm.bench.machine import measure_bandwidth
from tierlm.bench.phases import EngineSide, PhaseRow, PhaseShapes, TransformersSide, make_prompts, measure_paired
from tierlm.bench.transformers_peer import load_peer
from tierlm.core.errors import TierlmError
from tierlm.core.registry import QUANT_ACTIVATIONS

REFERENCE_DTYPE = "fp32"
BLOCK_SIZE = 16
DEFAULT_PREFILL_LENS = (512, 1024, 2048, 4096, 8192)


def diff(a: list[list[int]], b: list[list[int]]) -> dict:
    first = [first_divergence(x, y) for x, y in zip(a, b)]
    return {"prompts": len(a), "exact_match": sum(f is None for f in first),
            "first_divergence": min((f for f in first if f is not None), default=None)}


def free_device_memory(device: torch.device) -> None:
    """Collect dropped engines/models and hand their cached device memory back (CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kv_blocks_for(seq_lens: list[int], batches: list[int], decode_len: int) -> int:
    """KV blocks that hold the longest single sequence in `seq_lens` and, separately, the largest decode
    batch of `decode_len`-token sequences (shapes run one at a time and free their blocks)."""
    cdiv = lambda n: -(-n // BLOCK_SIZE)  # noqa: E731
    return max([cdiv(n) for n in seq_lens] + [b * cdiv(decode_len) for b in batches] + [1])


# --variant keys: engine settings a side may change (the others are the tierlm side's)
VARIANT_KEYS = ("attention_backend", "kv_format", "enforce_eager", "sparse_budget", "quantization")


def make_llm(model: str | None, dtype: str, device: str, max_num_seqs: int, max_seq_len: int, num_kv_blocks: int,
             attention_backend: str = "auto", quantization: str = "none", quant_activations: str = "int16",
             kv_format: str | None = None, enforce_eager: bool = False, sparse_budget: int | None = None):
    """The engine both the timed runs and the reference use: no prefix cache, chunked prefill at the engine
    default (512 tokens a step), context max_seq_len tokens (capped at the model's), and a pool of at least
    num_kv_blocks blocks that also holds one whole context (so the engine caps nothing further).
    `sparse_budget`: Quest sparse decoding within that many tokens."""
    from tierlm import LLM
    from tierlm.config import SparseConfig

    blocks = max(num_kv_blocks, -(-max_seq_len // BLOCK_SIZE))
    sparse = SparseConfig(selector="quest", budget_tokens=sparse_budget) if sparse_budget else None
    return LLM(model, dtype=dtype, device=device, enable_prefix_caching=False, max_model_len=max_seq_len,
               block_size=BLOCK_SIZE, num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
               attention_backend=attention_backend, quantization=quantization, quant_activations=quant_activations,
               kv_format=kv_format, enforce_eager=enforce_eager, sparse=sparse)


def parse_variant(text: str) -> tuple[str, dict]:
    """"NAME:key=value,key=value" -> (NAME, settings) for another tierlm side (keys: VARIANT_KEYS)."""
    name, _, rest = text.partition(":")
    if not name or name == "tierlm" or not rest:
        raise ValueError(f"--variant {text!r}: give NAME:key=value[,key=value...], NAME not 'tierlm'")
    out: dict = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in VARIANT_KEYS:
            raise ValueError(f"--variant {text!r}: {item!r} is not key=value with a key in {', '.join(VARIANT_KEYS)}")
        if key == "enforce_eager":
            out[key] = value.lower() in ("1", "true", "yes")
        elif key == "sparse_budget":
            if not value.isdigit():
                raise ValueError(f"--variant {text!r}: sparse_budget takes a number of tokens, not {value!r}")
            out[key] = int(value)
        else:
            out[key] = value
    return name, out


def reference_tokens(model: str | None, device: str, prompt_sets: list[list[list[int]]], new_tokens: int,
                     attention_backend: str = "auto") -> list[list[list[int]]]:
    """Greedy tokens (EOS ignored) of a tierlm engine in fp32 on `device` (the reference config), one list of
    per-prompt token lists for each prompt set. The engine is built here and freed before returning."""
    longest = max((len(p) + new_tokens for s in prompt_sets for p in s), default=new_tokens + 1)
    blocks = kv_blocks_for([], [len(s) for s in prompt_sets], longest)
    ref = make_llm(model, REFERENCE_DTYPE, device, max((len(s) for s in prompt_sets), default=1), longest, blocks,
                   attention_backend)
    try:
        side = EngineSide(ref.engine)
        return [side.generate(prompts, new_tokens).tokens for prompts in prompt_sets]
    finally:
        ref = side = None
        free_device_memory(torch.device(device))


def reference_report(cases: list[dict], ref_tokens: list[list[list[int]]]) -> list[dict]:
    """Per batch: tierlm vs the fp32 reference and (where the peer ran) transformers vs it. `cases` holds
    {"batch", "tierlm": tokens, "transformers": tokens or None}, in the order of `ref_tokens`."""
    out = []
    for case, ref in zip(cases, ref_tokens):
        entry = {"batch": case["batch"], "reference_dtype": REFERENCE_DTYPE, "tierlm": diff(case["tierlm"], ref)}
        if case.get("transformers") is not None:
            entry["transformers"] = diff(case["transformers"], ref)
        out.append(entry)
    return out


def cap_prefill_lens(lens: list[int], context: int) -> tuple[list[int], list[str]]:
    """Prefill lengths that fit `context` with one new token (longer ones become context - 1; duplicates
    dropped, order kept), and a note for each one capped."""
    out, notes = [], []
    for n in lens:
        m = min(n, context - 1)
        if m != n:
            notes.append(f"prefill length {n} capped at {m}: prompt + 1 new token must fit the {context}-token context")
        if m not in out:
            out.append(m)
    return out, notes


def achieved_gb_s(row: PhaseRow, tok_s: float | None, weight_bytes: int | None,
                  kv_bytes_per_token: int) -> float | None:
    """Decode rows: bytes one step reads (every weight once + the batch's KV at the mean context) x steps/s."""
    if row.phase != "decode" or not tok_s or weight_bytes is None:
        return None
    ctx = row.prompt_len + row.new_tokens / 2
    return (weight_bytes + row.batch * ctx * kv_bytes_per_token) * (tok_s / row.batch) / 1e9


def _diff_line(what: str, batch: int, g: dict) -> str:
    flag = "OK" if g["exact_match"] == g["prompts"] else "DIVERGED"
    return (f"greedy diff {what}, batch {batch}: {g['exact_match']}/{g['prompts']} exact "
            f"(first divergence at token {g['first_divergence']}) {flag}")


class _Table:
    """The printed table: one line per PhaseRow, one tok/s (and GB/s) column per side."""

    def __init__(self, names: list[str], gb_s, bandwidth: float):
        self.names, self.gb_s, self.bw = names, gb_s, bandwidth

    def header(self) -> str:
        cols = "".join(f"  {n + ' tok/s':>18}" for n in self.names)
        ratio = "".join(f"  {self.names[0] + ' / ' + n:>24}  {'per-rep range':<13}" for n in self.names[1:])
        gbs = "".join(f"  {n + ' GB/s (% bw)':>26}" for n in self.names)
        return f"{'phase':<8} {'shape':<46}{cols}{ratio}{gbs}"

    def line(self, row: PhaseRow) -> str:
        cols = "".join(f"  {_num(row.tok_per_s.get(n)):>18}" for n in self.names)
        ratio = ""
        for n in self.names[1:]:
            r = row.ratios.get(n)
            rng = f"{r[1]:.2f}x-{r[2]:.2f}x" if r else ""
            ratio += f"  {(f'{r[0]:.2f}x' if r else ''):>24}  {rng:<13}"
        gbs = ""
        for n in self.names:
            g = self.gb_s(row, row.tok_per_s.get(n), n)
            gbs += f"  {(f'{g:.1f} ({100 * g / self.bw:.0f}%)' if g is not None and self.bw else ''):>26}"
        return f"{row.phase:<8} {row.shape:<46}{cols}{ratio}{gbs}".rstrip()


def _num(v: float | None) -> str:
    return f"{v:,.1f}" if v is not None else "-"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tierlm.bench.perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both engines run")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length for the decode runs")
    ap.add_argument("--prefill-len", type=int, nargs="+", default=list(DEFAULT_PREFILL_LENS),
                    help="prompt lengths of the prefill rows (one prompt, one new token each)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="paired repetitions; the median is reported")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "torch", "triton"],
                    help="the engine's attention backend (torch: the gather + mask reference path)")
    ap.add_argument("--kv-format", default=None, help="the tierlm side's KV format (default: the compute dtype)")
    ap.add_argument("--enforce-eager", action="store_true", help="the tierlm side never replays CUDA graphs")
    ap.add_argument("--sparse-budget", type=int, default=None, metavar="TOKENS",
                    help="the tierlm side decodes with Quest sparse attention within TOKENS")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="another tierlm side, paired in the same run: the tierlm side's settings with these "
                         f"changed (keys: {', '.join(VARIANT_KEYS)}), e.g. eager:enforce_eager=1 or "
                         "fp8-sparse:kv_format=fp8_e4m3,sparse_budget=2048; repeatable")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--peer-cache", choices=["static", "dynamic"], default="static",
                    help="transformers' KV cache: static (preallocated) or dynamic (its default); which is faster "
                         "depends on the machine, so compare with both before quoting a ratio")
    ap.add_argument("--peer-compile", action="store_true",
                    help="let transformers' generate() torch.compile its forward on CUDA (slow first calls)")
    ap.add_argument("--no-reference", action="store_true",
                    help="with --dtype other than fp32: skip the greedy diff of both sides against a tierlm "
                         "engine in fp32 (built after the timed runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--progress", action="store_true", help="print each row as soon as it is measured")
    ap.add_argument("--quantization", default="none", help="weight format of the tierlm side (none, q4_1, q8_0, ...)")
    ap.add_argument("--quant-activations", default="int16", choices=QUANT_ACTIVATIONS)
    ap.add_argument("--baseline", action="store_true",
                    help="with --quantization: also run the unquantized engine as side tierlm-fp32")
    ap.add_argument("--llama-server", default=None, metavar="URL",
                    help="also drive llama.cpp's llama-server at URL (scripts/llama_server.sh serve)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if min(a.prefill_len) < 1 or min(a.batch) < 1 or a.prompt_len < 1 or a.reps < 1:
        ap.error("--prefill-len, --batch, --prompt-len and --reps take values >= 1")
    if a.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed needs a token after the first)")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here; use --device cpu")
    try:
        a.variants = [parse_variant(v) for v in a.variant]
    except ValueError as e:
        ap.error(str(e))
    try:
        return _run(a, ap)
    except TierlmError as e:
        print(f"tierlm.bench.perf: error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    decode_len = a.prompt_len + a.new_tokens
    max_seq_len = max(max(a.prefill_len) + 1, decode_len)
    blocks = kv_blocks_for([max_seq_len], a.batch, decode_len)
    own = dict(attention_backend=a.attention_backend, quantization=a.quantization, kv_format=a.kv_format,
               enforce_eager=a.enforce_eager, sparse_budget=a.sparse_budget)
    llm = make_llm(a.model, a.dtype, a.device, max(a.batch), max_seq_len, blocks, quant_activations=a.quant_activations,
                   **own)
    engine, tokenizer = llm.engine, llm.tokenizer
    context = engine.max_model_len
    if decode_len > context:
        ap.error(f"--prompt-len {a.prompt_len} + --new-tokens {a.new_tokens} exceeds the model's {context}-token "
                 "context; lower one of them")
    prefill_lens, notes = cap_prefill_lens(a.prefill_len, context)
    device = engine.device
    peer = None if a.no_peer else load_peer(a.model, dtype, a.device)
    sides = [EngineSide(engine)]
    from tierlm.bench.memory import weight_bytes as model_weight_bytes

    weights = {"tierlm": model_weight_bytes(engine.model)[1]}  # what one step reads (the bench's definition)
    kv_tok = {"tierlm": engine.kv_spec.bytes_per_token}
    variants = []  # kept alive for the timed runs
    for name, settings in a.variants:
        v = make_llm(a.model, a.dtype, a.device, max(a.batch), max_seq_len, blocks,
                     quant_activations=a.quant_activations, **{**own, **settings})
        variants.append(v)
        sides.append(EngineSide(v.engine, name=name))
        weights[name] = model_weight_bytes(v.engine.model)[1]
        kv_tok[name] = v.engine.kv_spec.bytes_per_token
    base = None
    if a.baseline and a.quantization != "none":
        base = make_llm(a.model, a.dtype, a.device, max(a.batch), max_seq_len, blocks, a.attention_backend)
        sides.append(EngineSide(base.engine, name=f"tierlm-{a.dtype}"))
        weights[sides[-1].name] = model_weight_bytes(base.engine.model)[1]
        kv_tok[sides[-1].name] = base.engine.kv_spec.bytes_per_token
    if a.llama_server:
        from tierlm.bench.http_driver import check_server
        from tierlm.bench.phases import LlamaServerSide

        check_server(a.llama_server)
        sides.append(LlamaServerSide(a.llama_server))
    if peer is not None:
        sides.append(TransformersSide(peer, cache_implementation=None if a.peer_cache == "dynamic" else "static",
                                      compile=a.peer_compile))
    names = [s.name for s in sides]
    cfg = engine.model_config
    weight_bytes = weights["tierlm"]
    backend = engine.attention_backend.name
    captured = engine.runner.graphs is not None  # a bool: nothing here may keep the engine alive
    chunk = engine.config.scheduler.max_num_batched_tokens
    bw = measure_bandwidth(1 << 30 if device.type == "cuda" else 256 << 20, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    gb_s = lambda row, tok_s, name: achieved_gb_s(row, tok_s, weights.get(name), kv_tok.get(name, 0))  # noqa: E731
    table = _Table(names, gb_s, bw)
    for n in notes:
        print(f"note: {n}")
    if a.progress:
        print(table.header(), flush=True)
    shapes = PhaseShapes(prefill_lens=tuple(prefill_lens), prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                         batches=tuple(a.batch), reps=a.reps)
    rows = measure_paired(sides, tokenizer, shapes,
                          progress=(lambda r: print(table.line(r), flush=True)) if a.progress else None)
    decode_rows = [r for r in rows if r.phase == "decode"]
    gate = [{"batch": r.batch, "side": n, **diff(r.tokens["tierlm"], r.tokens[n])}
            for r in decode_rows for n in names[1:] if n in r.tokens]

    reference, reference_error = None, None
    if a.dtype != REFERENCE_DTYPE and not a.no_reference and decode_rows:
        # After every timed run: free the timed engine and peer, then generate the same prompts with tierlm in
        # fp32 on the same device. A failure here (e.g. no room for fp32 weights) must not lose the
        # measurements: it is reported.
        llm = engine = peer = sides = base = variants = None
        free_device_memory(device)
        try:
            ref = reference_tokens(a.model, a.device, [make_prompts(tokenizer, r.batch, a.prompt_len)
                                                       for r in decode_rows], a.new_tokens, a.attention_backend)
            cases = [{"batch": r.batch, "tierlm": r.tokens["tierlm"], "transformers": r.tokens.get("transformers")}
                     for r in decode_rows]
            reference = reference_report(cases, ref)
        except Exception as e:  # noqa: BLE001
            reference_error = f"{type(e).__name__}: {e}"
            free_device_memory(device)

    print(f"\nmodel {cfg.model_id}, {a.dtype}, {device.type} ({where}); weights {weight_bytes / 1e6:.0f} MB; "
          f"KV {kv_tok['tierlm']} B/token; measured copy bandwidth {bw:.1f} GB/s; attention backend {backend}"
          f"{' (decode captured in CUDA graphs)' if captured else ''}; "
          f"prefill chunked at {chunk} tokens a step; {a.reps} paired rep(s), medians"
          + ("" if a.no_peer else f"; transformers with its {a.peer_cache} KV cache"))
    print(table.header())
    for r in rows:
        print(table.line(r))
    for n in notes:
        print(f"note: {n}")
    for g in gate:
        print(_diff_line(f"vs {g['side']}", g["batch"], g))
    if reference_error:
        print(f"fp32 reference check failed: {reference_error}")
    for r in reference or []:
        print(_diff_line(f"tierlm-{a.dtype} vs tierlm-{r['reference_dtype']} reference", r["batch"], r["tierlm"]))
        if "transformers" in r:
            print(_diff_line(f"transformers-{a.dtype} vs tierlm-{r['reference_dtype']} reference", r["batch"],
                             r["transformers"]))
    if a.json:
        env = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "bandwidth_gb_s": bw, "device": device.type,
               "dtype": a.dtype, "model": cfg.model_id, "peer_compile": a.peer_compile, "peer_cache": a.peer_cache,
               "attention_backend": backend, "max_num_batched_tokens": chunk, "context": context, "reps": a.reps,
               "quantization": a.quantization, "quant_activations": a.quant_activations,
               "weight_bytes_per_step": weights, "kv_bytes_per_token": kv_tok, "llama_server": a.llama_server,
               "captured_decode": captured, "kv_format": a.kv_format, "sparse_budget": a.sparse_budget,
               "variants": {n: s for n, s in a.variants}}
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
            env["cuda"] = torch.version.cuda
        if "transformers" in names:
            import transformers

            env["transformers"] = transformers.__version__
        out_rows = []
        for r in rows:
            d = dataclasses.asdict(r)
            del d["tokens"]
            d["achieved_gb_s"] = {n: gb_s(r, r.tok_per_s.get(n), n) for n in names} if r.phase == "decode" else None
            out_rows.append(d)
        out = {"environment": env, "sides": names, "rows": out_rows, "correctness": gate, "notes": notes}
        if reference is not None:
            out["reference"] = reference
        if reference_error:
            out["reference_error"] = reference_error
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
