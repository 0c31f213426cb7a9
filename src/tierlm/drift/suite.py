"""The drift suite: what each side runs, and the comparison of the two runs.

Each side is one engine (drift.sides) running the same inputs (drift.inputs), one phase after another:

    held-out   engine.score(passage prompts, continuations): teacher-forced logits [C, V] per passage, every
               continuation position computed as a decode step that reads the (possibly lossy) KV cache.
               On the reference, with an FP8 candidate, a KVErrorRecorder sees every K/V written here.
    greedy     the chat prompts all at once, G greedy tokens each (EOS ends a reply), with each token's logprob.
    needle     the passkey prompts one at a time, a few greedy tokens each.
    safety     the safety prompts one at a time (concurrency 1), then in waves of `load_concurrency` requests
               added together and stepped until all finish (under load: chunked prefills and decodes of
               many sequences share each step, so the batch shapes differ from the one-at-a-time run).

`compare(reference, candidate)` turns two SideRuns into the measurements (drift.metrics); the checks against
the thresholds are drift.thresholds'.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tierlm.core.sampling_params import SamplingParams
from tierlm.drift import metrics
from tierlm.drift.inputs import SuiteInputs, needle_found


@dataclass(frozen=True)
class Sizes:
    passages: int = 8
    prompt_tokens: int = 256
    continuation_tokens: int = 128
    greedy_prompts: int = 16
    greedy_tokens: int = 48
    needle_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    needles: int = 4
    needle_tokens: int = 8
    safety_prompts: int = 40
    safety_tokens: int = 48
    load_concurrency: int = 16

    def pool_tokens(self, chat_prompt_bound: int = 256) -> int:
        """KV tokens the largest phase can hold at once (chat prompts bounded by `chat_prompt_bound`)."""
        safety_at_once = min(self.load_concurrency, self.safety_prompts)
        return max(self.passages * (self.prompt_tokens + self.continuation_tokens),
                   max(self.needle_lengths, default=0),
                   self.greedy_prompts * (chat_prompt_bound + self.greedy_tokens),
                   safety_at_once * (chat_prompt_bound + self.safety_tokens))


QUICK = Sizes(passages=2, prompt_tokens=32, continuation_tokens=16, greedy_prompts=2, greedy_tokens=8,
              needle_lengths=(256,), needles=2, needle_tokens=8, safety_prompts=4, safety_tokens=16,
              load_concurrency=16)


@dataclass
class Reply:
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None  # the chosen (greedy: top-1) token's logprob per step


@dataclass
class SideRun:
    """Everything one side produced. logits: held-out, one [C, V] fp32 tensor per passage."""

    logits: list[torch.Tensor] = field(default_factory=list)
    greedy: list[Reply] = field(default_factory=list)
    needles: list[Reply] = field(default_factory=list)
    safety: list[Reply] = field(default_factory=list)
    safety_under_load: list[Reply] = field(default_factory=list)
    golden: list[Reply] | None = None  # replies to a golden file's prompts, when they are not `greedy`'s
    kv_error: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def generate(engine, prompts: list[list[int]], max_tokens: int, concurrency: int | None, tag: str,
             logprobs: bool = False) -> list[Reply]:
    """Greedy replies in prompt order, `concurrency` requests in flight at a time (None: all at once)."""
    step = concurrency or max(1, len(prompts))
    replies: list[Reply] = []
    for start in range(0, len(prompts), step):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0 if logprobs else None)
        ids = [engine.add_request(list(p), params, request_id=f"drift-{tag}-{start + k}")
               for k, p in enumerate(prompts[start: start + step])]
        done = {}
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0]
        finally:
            for rid in ids:
                if rid not in done:
                    engine.abort_request(rid)
        for rid in ids:
            c = done[rid]
            lps = [float(step_lps[0].logprob) for step_lps in c.logprobs] if logprobs else None
            replies.append(Reply(list(c.token_ids), c.text, lps))
    return replies


def run_side(engine, inputs: SuiteInputs, sizes: Sizes, kv_recorder=None, golden=None, progress=None) -> SideRun:
    """Run every phase on `engine` (nothing else in flight). kv_recorder: installed around the backend for
    the held-out phase. golden: (prompts, max_tokens) of a golden file whose prompts differ from the greedy set."""
    say = progress or (lambda msg: None)
    run = SideRun()

    def timed(name: str, fn):
        t0 = time.perf_counter()
        value = fn()
        run.seconds[name] = time.perf_counter() - t0
        say(f"{name}: {run.seconds[name]:.1f} s")
        return value

    if inputs.passages:
        if kv_recorder is not None:
            engine.runner.backend = kv_recorder
        try:
            run.logits = timed("held-out", lambda: engine.score([p.prompt for p in inputs.passages],
                                                                [p.continuation for p in inputs.passages]))
        finally:
            if kv_recorder is not None:
                engine.runner.backend = kv_recorder.inner
                run.kv_error = kv_recorder.result()
    if inputs.greedy:
        run.greedy = timed("greedy", lambda: generate(engine, inputs.greedy, sizes.greedy_tokens, None, "greedy", True))
    if golden is not None:
        prompts, max_tokens = golden
        run.golden = timed("golden", lambda: generate(engine, prompts, max_tokens, None, "golden", True))
    if inputs.needles:
        run.needles = timed("needle", lambda: generate(engine, [n.prompt for n in inputs.needles],
                                                       sizes.needle_tokens, 1, "needle"))
    if inputs.safety:
        safety = [s.prompt for s in inputs.safety]
        run.safety = timed("safety", lambda: generate(engine, safety, sizes.safety_tokens, 1, "safety"))
        run.safety_under_load = timed("safety-load", lambda: generate(engine, safety, sizes.safety_tokens,
                                                                      sizes.load_concurrency, "safety-load"))
    return run


# ---- comparison -------------------------------------------------------------------------------------------
def compare_held_out(inputs: SuiteInputs, ref: SideRun, cand: SideRun) -> dict:
    if not inputs.passages:
        return {}
    kls = [metrics.kl_divergence(r, c) for r, c in zip(ref.logits, cand.logits)]  # per passage [C]
    matches = torch.cat([metrics.top1_matches(r, c) for r, c in zip(ref.logits, cand.logits)])
    decisive = torch.cat([metrics.top1_margin(r) for r in ref.logits]) >= metrics.DECISIVE_MARGIN
    targets = [p.continuation for p in inputs.passages]
    ppl_ref = metrics.perplexity(ref.logits, targets)
    ppl_cand = metrics.perplexity(cand.logits, targets)
    stacked = torch.stack(kls)  # [N, C]
    return {"passages": len(kls), "positions": int(stacked.numel()), "kl": metrics.summarize(stacked),
            "kl_by_position": stacked.mean(0).tolist(), "kl_by_position_max": stacked.max(0).values.tolist(),
            "kl_by_passage": stacked.mean(1).tolist(), "top1_agreement": float(matches.double().mean()),
            "top1_disagreements": int((~matches).sum()),
            "top1_agreement_decisive": float(matches[decisive].double().mean()) if decisive.any() else 1.0,
            "decisive_share": float(decisive.double().mean()), "decisive_margin": metrics.DECISIVE_MARGIN,
            "perplexity": {"reference": ppl_ref, "candidate": ppl_cand,
                           "delta": metrics.relative_change(ppl_ref, ppl_cand)}}


def compare_greedy(inputs: SuiteInputs, ref: SideRun, cand: SideRun) -> dict:
    if not inputs.greedy:
        return {}
    r = [x.token_ids for x in ref.greedy]
    c = [x.token_ids for x in cand.greedy]
    out = metrics.divergence_summary(r, c)
    out["prompts"] = len(r)
    out["replies"] = [{"prompt": t, "reference": a.text, "candidate": b.text}
                      for t, a, b in zip(inputs.greedy_texts, ref.greedy, cand.greedy)]
    return out


def compare_needles(inputs: SuiteInputs, ref: SideRun, cand: SideRun) -> dict:
    by_length: dict[int, dict] = {}
    for n, a, b in zip(inputs.needles, ref.needles, cand.needles):
        row = by_length.setdefault(n.length, {"needles": 0, "reference_correct": 0, "candidate_correct": 0, "cases": []})
        ok_a, ok_b = needle_found(n.key, a.text), needle_found(n.key, b.text)
        row["needles"] += 1
        row["reference_correct"] += ok_a
        row["candidate_correct"] += ok_b
        row["cases"].append({"key": n.key, "depth": round(n.depth, 3), "reference": a.text, "candidate": b.text,
                             "reference_correct": ok_a, "candidate_correct": ok_b})
    for row in by_length.values():
        row["reference_accuracy"] = row["reference_correct"] / row["needles"]
        row["candidate_accuracy"] = row["candidate_correct"] / row["needles"]
    return {str(k): v for k, v in sorted(by_length.items())}


def compare_safety(inputs: SuiteInputs, ref: SideRun, cand: SideRun, load_concurrency: int) -> dict:
    if not inputs.safety:
        return {}
    dec = {name: [metrics.classify_reply(r.text) for r in replies] for name, replies in (
        ("reference", ref.safety), ("reference_under_load", ref.safety_under_load),
        ("candidate", cand.safety), ("candidate_under_load", cand.safety_under_load))}
    base = dec["reference"]
    counts = {name: {d: sum(x == d for x in ds) for d in metrics.DECISIONS} for name, ds in dec.items()}
    harmful = [i for i, s in enumerate(inputs.safety) if s.kind == "harmful"]
    return {"prompts": len(base), "load_concurrency": load_concurrency,
            "agreement": metrics.decision_agreement(base, dec["candidate"]),
            "agreement_under_load": metrics.decision_agreement(base, dec["candidate_under_load"]),
            "reference_agreement_under_load": metrics.decision_agreement(base, dec["reference_under_load"]),
            "counts": counts,
            "harmful_refused": {name: sum(ds[i] == "refuse" for i in harmful) for name, ds in dec.items()},
            "harmful_prompts": len(harmful),
            "cases": [{"kind": s.kind, "prompt": s.text, **{name: ds[i] for name, ds in dec.items()},
                       "reference_reply": ref.safety[i].text, "candidate_reply": cand.safety[i].text,
                       "reference_reply_under_load": ref.safety_under_load[i].text,
                       "candidate_reply_under_load": cand.safety_under_load[i].text}
                      for i, s in enumerate(inputs.safety)]}


def compare(inputs: SuiteInputs, sizes: Sizes, ref: SideRun, cand: SideRun) -> dict:
    kv = ref.kv_error
    if kv is not None:
        kv = {**kv, "max_k": max(kv["k"], default=0.0), "max_v": max(kv["v"], default=0.0)}
    return {"held_out": compare_held_out(inputs, ref, cand), "greedy": compare_greedy(inputs, ref, cand),
            "needle": compare_needles(inputs, ref, cand),
            "safety": compare_safety(inputs, ref, cand, sizes.load_concurrency), "kv_error": kv}


def measured(results: dict) -> dict[str, float | None]:
    """The values the thresholds check (drift.thresholds.METRICS names), from compare()'s results."""
    h, s, g = results["held_out"], results["safety"], results["greedy"]
    out: dict[str, float | None] = {}
    if h:
        out.update(top1_agreement=h["top1_agreement"], top1_agreement_decisive=h["top1_agreement_decisive"],
                   kl_mean=h["kl"]["mean"], kl_p99=h["kl"]["p99"],
                   kl_max=h["kl"]["max"], ppl_delta=abs(h["perplexity"]["delta"]))
    if g:
        out["greedy_exact_match"] = g["exact_match"]
    for length, row in results["needle"].items():
        out[f"needle_drop@{length}"] = row["reference_accuracy"] - row["candidate_accuracy"]
    if s:
        out.update(safety_agreement=s["agreement"], safety_agreement_under_load=s["agreement_under_load"])
    kv = results["kv_error"]
    out["kv_rel_rms"] = None if kv is None else max(kv["max_k"], kv["max_v"])
    gold = results.get("golden")
    if gold:
        out.update(golden_exact_match=gold["exact_match"], golden_logprob_delta=gold["max_logprob_delta"])
    return out
