"""Phase speeds with stated shapes, the same for the engine and the transformers peer.

    prefill   one prompt of `prefill_len` tokens, one new token: prompt tokens / time to first token
    decode    `batch` prompts of `prompt_len` tokens, `new_tokens` new each (greedy, EOS ignored):
              batch x (new_tokens - 1) / (generation time - prefill time)
    e2e       batch x new_tokens / whole generation time

The median over `reps` timed repetitions is kept, after one untimed warm-up.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from tierlm.bench.engine_driver import greedy


@dataclass(frozen=True)
class PhaseShapes:
    prefill_len: int = 512
    prompt_len: int = 32
    new_tokens: int = 64
    batches: tuple[int, ...] = (1, 16)
    reps: int = 2


def make_prompts(tokenizer, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` distinct prompts of exactly `length` tokens from a fixed text."""
    text = ("Memory bandwidth, not arithmetic, bounds how fast a language model decodes. "
            "Each new token reads every weight once, and the cache grows with the context. ") * 64
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < length + 7 * batch + 97:
        ids = ids + ids
    return [ids[(seed + 7 * i) % 97:][:length] for i in range(batch)]


def _sync(engine) -> None:
    """Wait for the engine's queued device work (CUDA), so wall-clock timings cover it. Every step already
    waits for its sampled token ids; this keeps the bounds exact should that ever change."""
    dev = getattr(engine, "device", None)
    if dev is not None and getattr(dev, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def engine_generate(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Time one batch through the engine: prefill (until every request has a token), then decode."""
    _sync(engine)
    t0 = time.perf_counter()
    ids = [engine.add_request(list(p), greedy(new_tokens), request_id=f"phase-{i}") for i, p in enumerate(prompts)]
    first: dict[str, float] = {}
    done: dict[str, list[int]] = {}
    while len(done) < len(ids):
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    _sync(engine)
    t1 = time.perf_counter()
    t_first = max(first.values())
    return {"prefill_s": t_first - t0, "decode_s": t1 - t_first, "total_s": t1 - t0,
            "tokens": [done[i] for i in ids]}


def measure_phases(generate, tokenizer, shapes: PhaseShapes, tick=None) -> list[dict]:
    """Rows {phase, batch, shape, tok_per_s} for one side; `generate(prompts, new_tokens) -> timing dict`."""
    def timed(prompts, new):
        generate(prompts, min(new, 4))  # warm-up
        res = [generate(prompts, new) for _ in range(shapes.reps)]
        if tick:
            tick()
        return res

    rows = []
    pp = make_prompts(tokenizer, 1, shapes.prefill_len)
    res = timed(pp, 1)
    rows.append({"phase": "prefill", "batch": 1, "shape": f"1 x {shapes.prefill_len}-token prompt",
                 "tok_per_s": shapes.prefill_len / statistics.median(r["prefill_s"] for r in res)})
    for b in shapes.batches:
        prompts = make_prompts(tokenizer, b, shapes.prompt_len)
        res = timed(prompts, shapes.new_tokens)
        shape = f"batch {b}, {shapes.prompt_len}-token prompts, {shapes.new_tokens} new tokens"
        dec = statistics.median(r["decode_s"] for r in res)
        tot = statistics.median(r["total_s"] for r in res)
        rows.append({"phase": "decode", "batch": b, "shape": shape,
                     "tok_per_s": b * (shapes.new_tokens - 1) / dec if dec > 0 else None})
        rows.append({"phase": "e2e", "batch": b, "shape": shape, "tok_per_s": b * shapes.new_tokens / tot})
    return rows
