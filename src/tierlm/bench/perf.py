"""Engine speed on one model, side by side with transformers' generate() in the same run.

Prints prefill tok/s (one 512-token prompt), decode tok/s at batch 1 and batch 16 (128 new tokens,
greedy, EOS ignored), achieved GB/s against this machine's measured copy bandwidth (the GPU's own
device-to-device copy bandwidth with --device cuda), and the greedy token diff between tierlm and the
peer (a faster wrong answer is a bug). Both sides run on --device; on CUDA, transformers runs eagerly
(its generate() auto-compile is off unless --peer-compile), and every timing synchronizes the device.

With --dtype other than fp32, the tierlm-vs-transformers diff alone misleads: both sides round, and a
divergence may be either side's. So after the timed runs (the bf16 engine and peer freed first) a tierlm
engine in fp32 on the same device, the reference config, generates the same decode prompts greedily, and
each batch also reports tierlm vs that reference and transformers vs that reference (--no-reference skips
it). In fp32 runs tierlm is the reference itself and only the tierlm-vs-transformers diff is reported.

    python -m tierlm.bench.perf [--model default] [--device cpu|cuda] [--dtype fp32|bf16] [--batch 1 16]
                                [--new-tokens 128] [--json out.json] [--no-reference]

--model takes the default model, a .gguf file or a Hugging Face directory (e.g. random weights in the
default model's shape: python -m tierlm.bench.random_model OUT --like CONFIG_DIR).
"""
from __future__ import annotations

import argparse
import gc
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


REFERENCE_DTYPE = "fp32"


def free_device_memory(device: torch.device) -> None:
    """Collect dropped engines/models and hand their cached device memory back (CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_llm(model: str | None, dtype: str, device: str, max_num_seqs: int, max_num_batched_tokens: int = 512):
    """The engine both the timed runs and the reference use: no prefix cache, a 1 GiB KV pool."""
    from tierlm import LLM

    return LLM(model, dtype=dtype, device=device, enable_prefix_caching=False, kv_cache_memory=1 << 30,
               max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)


def reference_tokens(model: str | None, device: str, prompt_sets: list[list[list[int]]], new_tokens: int,
                     max_num_batched_tokens: int = 512) -> list[list[list[int]]]:
    """Greedy tokens (EOS ignored) of a tierlm engine in fp32 on `device` (the reference config), one list of
    per-prompt token lists for each prompt set. The engine is built here and freed before returning."""
    ref = make_llm(model, REFERENCE_DTYPE, device, max((len(p) for p in prompt_sets), default=1),
                   max_num_batched_tokens)
    try:
        return [engine_generate(ref.engine, prompts, new_tokens)["tokens"] for prompts in prompt_sets]
    finally:
        ref = None
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


def _diff_line(what: str, batch: int, g: dict) -> str:
    flag = "OK" if g["exact_match"] == g["prompts"] else "DIVERGED"
    return (f"greedy diff {what}, batch {batch}: {g['exact_match']}/{g['prompts']} exact "
            f"(first divergence at token {g['first_divergence']}) {flag}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both engines run")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length for the decode runs")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="paired repetitions; the median is reported")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--peer-compile", action="store_true",
                    help="let transformers' generate() torch.compile its forward on CUDA (slow first calls)")
    ap.add_argument("--no-reference", action="store_true",
                    help="with --dtype other than fp32: skip the greedy diff of both sides against a tierlm "
                         "engine in fp32 (built after the timed runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--progress", action="store_true", help="print each case's row as soon as it is measured")
    a = ap.parse_args(argv)

    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    llm = make_llm(a.model, a.dtype, a.device, max(a.batch), max(512, a.prefill_len))
    device = llm.engine.device
    peer = None if a.no_peer else load_peer(a.model, dtype, a.device)
    has_peer = peer is not None
    cfg = llm.engine.model_config
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = cfg.num_params * elem
    kv_tok = llm.engine.kv_spec.bytes_per_token
    bw = measure_bandwidth(1 << 30 if device.type == "cuda" else 256 << 20, device=device)
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
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
        if a.progress:  # a partial record survives a run cut short
            print("  " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
        return row

    def paired(prompts, new_tokens):
        """Warm both sides up, then alternate tierlm and the peer rep by rep, so a burst of load from
        elsewhere on a shared machine hits both sides rather than one."""
        run_tierlm(llm, prompts, min(new_tokens, 8))
        if peer is not None:
            run_transformers(peer, prompts, min(new_tokens, 8), compile=a.peer_compile)
        ours, theirs = [], []
        for _ in range(a.reps):
            ours.append(run_tierlm(llm, prompts, new_tokens))
            if peer is not None:
                theirs.append(run_transformers(peer, prompts, new_tokens, compile=a.peer_compile))
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
    cases = []  # per batch: the prompts and both sides' first-rep tokens, for the reference check
    for b in a.batch:
        prompts = make_prompts(llm.tokenizer, b, a.prompt_len)
        ours, theirs = paired(prompts, a.new_tokens)
        record(f"decode b{b}", "tierlm", b, a.prompt_len, ours, "decode")
        cases.append({"batch": b, "prompts": prompts, "tierlm": ours[0]["tokens"],
                      "transformers": theirs[0]["tokens"] if theirs else None})
        if theirs:
            record(f"decode b{b}", "transformers", b, a.prompt_len, theirs, "decode")
            spread(f"decode b{b}", "decode_s", ours, theirs)
            gate.append({"batch": b, **diff(ours[0]["tokens"], theirs[0]["tokens"])})

    reference, reference_error = None, None
    if a.dtype != REFERENCE_DTYPE and not a.no_reference and cases:
        # After every timed run: free the timed engine and peer (the closures above name them too), then
        # generate the same prompts with tierlm in fp32 on the same device.
        # A failure here (e.g. no room for fp32 weights) must not lose the measurements: it is reported.
        llm = peer = None
        free_device_memory(device)
        try:
            ref = reference_tokens(a.model, a.device, [c["prompts"] for c in cases], a.new_tokens,
                                   max_num_batched_tokens=max(512, a.prefill_len))
            reference = reference_report(cases, ref)
        except Exception as e:  # noqa: BLE001
            reference_error = f"{type(e).__name__}: {e}"
            free_device_memory(device)

    print(f"\nmodel {cfg.model_id}, {a.dtype}, {device.type} ({where}); "
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
        print(_diff_line("vs transformers", g["batch"], g))
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
               "dtype": a.dtype, "model": cfg.model_id, "peer_compile": a.peer_compile}
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
            env["cuda"] = torch.version.cuda
        if has_peer:
            import transformers

            env["transformers"] = transformers.__version__
        with open(a.json, "w") as f:
            out = {"environment": env, "rows": rows, "correctness": gate,
                   "ratio_range": {k: list(v) for k, v in spreads.items()}}
            if reference is not None:
                out["reference"] = reference
            if reference_error:
                out["reference_error"] = reference_error
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
