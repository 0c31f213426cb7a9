"""The one speed harness: phase speeds with stated shapes, engines side by side, reps paired.

Definitions (one timed generation of a batch, greedy, EOS ignored, every request `new_tokens` long):

    prefill   one prompt of L tokens, one new token:  L / time to first token
    decode    `batch` prompts of `prompt_len` tokens:  batch x (new_tokens - 1) / (generation time - prefill time)
              (prefill time = until every request of the batch has its first token)
    e2e       the same generation:                     batch x new_tokens / whole generation time

Algorithm (`measure_paired`): for every prefill length, then every decode batch, each side generates the
shape once untimed (warm-up: first-call allocations, kernels), then the sides take turns rep by rep
(A B A B ...), so a burst of load on a shared machine hits both sides rather than one. A row keeps each
side's median tok/s over the reps, and sides[0] / sides[1] as the median of the per-rep speed ratios
(each rep's pair ran back to back) with their min and max. CUDA timings synchronize the device first
and last, so wall-clock time covers the queued device work.

A `Side` is one engine under test: `EngineSide` (tierlm, through the in-process driver
`engine_driver.run_engine`), `TransformersSide` (transformers' generate()) and `LlamaServerSide` (llama.cpp's
server over HTTP).
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PhaseShapes:
    prefill_lens: tuple[int, ...] = (512,)  # one prompt each, one new token
    prompt_len: int = 32  # decode prompts
    new_tokens: int = 64
    batches: tuple[int, ...] = (1, 16)
    reps: int = 2  # timed reps per side after one untimed warm-up


@dataclass
class Timing:
    """One timed generation of a batch by one side (seconds; tokens: each prompt's generated ids)."""
    prefill_s: float
    decode_s: float
    total_s: float
    tokens: list[list[int]]


class Side(Protocol):
    """One engine under test: generates `new_tokens` greedy tokens (EOS ignored) for every prompt."""
    name: str

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Timing: ...


@dataclass
class PhaseRow:
    phase: str  # "prefill" | "decode" | "e2e"
    batch: int
    prompt_len: int
    new_tokens: int
    shape: str  # human line, e.g. "1 x 512-token prompt"
    tok_per_s: dict[str, float | None]  # side name -> median tok/s over reps
    ratio: float | None  # sides[0] / sides[1]: median of the per-rep ratios; None with one side
    ratio_range: tuple[float, float] | None  # min, max of the per-rep ratios
    # sides[0] / each other side: (median, min, max) of the per-rep ratios (ratio above is sides[1]'s)
    ratios: dict[str, tuple[float, float, float]]
    tokens: dict[str, list[list[int]]]  # first timed rep's greedy tokens per side (decode rows; [] otherwise)


_TEXT = ("Memory bandwidth, not arithmetic, bounds how fast a language model decodes. "
         "Each new token reads every weight once, and the cache grows with the context. ")


def make_prompts(tokenizer, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` distinct prompts of exactly `length` tokens from a fixed text (any length).

    The text is numbered notes ("Note 1. <fixed text> Note 2. ..."); prompt i starts at note seed + i + 1,
    so prompts differ at their note numbers (a few tokens in) and the stream never repeats (windows at
    different offsets of a plain repeated text coincided). Same tokenizer, same ids."""
    if batch < 1 or length < 1:
        raise ValueError(f"make_prompts: batch {batch} and length {length} must both be >= 1")
    notes: list[list[int]] = []

    def note(k: int) -> list[int]:
        while len(notes) < k:
            notes.append(tokenizer.encode(f"Note {len(notes) + 1}. {_TEXT}", add_special_tokens=False))
        return notes[k - 1]

    prompts = []
    for i in range(batch):
        k, ids = seed + i + 1, []
        while len(ids) < length:
            ids += note(k)
            k += 1
        prompts.append(ids[:length])
    return prompts


def _sync(device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere), so wall-clock timings cover it."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


class EngineSide:
    """tierlm: an LLMEngine driven by the bench's in-process driver (`engine_driver.run_engine`), all
    prompts admitted at once (closed loop, concurrency = batch); prefill ends when the last request of the
    batch has its first token."""

    def __init__(self, engine, name: str = "tierlm"):
        self.engine = engine
        self.name = name

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        from tierlm.bench.arrivals import ArrivalPlan
        from tierlm.bench.engine_driver import run_engine
        from tierlm.bench.workloads import BenchRequest

        requests = [BenchRequest(list(p), new_tokens) for p in prompts]
        _sync(self.engine.device)
        run = run_engine(self.engine, requests, ArrivalPlan(concurrency=len(requests)))
        _sync(self.engine.device)
        end = time.monotonic()  # run_engine's clock
        records = sorted(run.records, key=lambda r: r.index)
        if not run.complete or len(records) != len(prompts) or any(r.token_ids is None for r in records):
            raise RuntimeError(f"{self.name}: the engine run ended with {len(records)} of {len(prompts)} requests "
                               "finished; see the engine's log")
        first = max(r.token_times[0] for r in records)
        return Timing(prefill_s=first - run.start, decode_s=end - first, total_s=end - run.start,
                      tokens=[list(r.token_ids) for r in records])


class TransformersSide:
    """transformers' generate() on equal-length prompts (no padding), greedy, EOS ignored.

    Prefill time is a separate generate() of one new token; decode time is the whole generation minus
    that (with new_tokens == 1 the one call is both). cache_implementation None: transformers' default
    dynamic cache (no multi-second first-call setup); "static" (default): a preallocated cache. compile:
    let generate() torch.compile its forward where it would (a static cache on CUDA); off by default, or
    a first-call compile per shape would be timed as generation."""

    def __init__(self, model, name: str = "transformers", cache_implementation: str | None = "static",
                 compile: bool = False):
        self.model = model
        self.name = name
        self.cache_implementation = cache_implementation
        self.compile = compile

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        import torch

        dev = self.model.device
        x = torch.tensor(prompts, device=dev)
        kw = dict(do_sample=False, pad_token_id=0)
        if self.cache_implementation:
            kw["cache_implementation"] = self.cache_implementation
        if not self.compile and dev.type != "cpu":
            kw["disable_compile"] = True
        with torch.inference_mode():
            _sync(dev)
            t0 = time.perf_counter()
            out = self.model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            _sync(dev)
            t1 = time.perf_counter()
            if new_tokens > 1:
                out = self.model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                _sync(dev)
            t2 = time.perf_counter()
        prefill = t1 - t0
        total = t2 - t1 if new_tokens > 1 else prefill
        return Timing(prefill_s=prefill, decode_s=total - prefill, total_s=total,
                      tokens=out[:, x.shape[1]:].tolist())


class LlamaServerSide:
    """llama.cpp's llama-server over HTTP (scripts/llama_server.sh), through its native streaming /completion
    endpoint: the prompt as token ids, greedy, EOS ignored, `cache_prompt` off (every rep recomputes, as the
    engine sides do), token ids returned. The batch's requests are sent at once (one thread each); prefill
    ends when the last of them has its first token. Its times include HTTP and JSON, a few hundred
    microseconds per token on loopback, which the in-process sides do not pay."""

    def __init__(self, url: str, name: str = "llama.cpp", timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.name = name
        self.client = httpx.Client(timeout=timeout)

    def _one(self, prompt: list[int], new_tokens: int, start: float) -> tuple[float, float, list[int]]:
        body = {"prompt": list(prompt), "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "stream": True,
                "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}
        first, tokens = None, []
        with self.client.stream("POST", f"{self.url}/completion", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {resp.status_code} from {self.url}/completion: {resp.read()[:200]!r}")
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                got = chunk.get("tokens") or []
                if got and first is None:
                    first = time.perf_counter() - start
                tokens.extend(got)
        return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: self._one(p, new_tokens, start), prompts))
        first = max(r[0] for r in results)
        total = max(r[1] for r in results)
        return Timing(prefill_s=first, decode_s=total - first, total_s=total, tokens=[r[2] for r in results])


def _paired(sides: list[Side], prompts: list[list[int]], new_tokens: int, reps: int) -> list[list[Timing]]:
    """Per side, its `reps` timings: one untimed warm-up each, then the sides in turn rep by rep."""
    for side in sides:
        side.generate(prompts, min(new_tokens, 8))
    timings: list[list[Timing]] = [[] for _ in sides]
    for _ in range(reps):
        for side, out in zip(sides, timings):
            out.append(side.generate(prompts, new_tokens))
    return timings


def _rate(work: float, seconds: float) -> float | None:
    return work / seconds if seconds > 0 else None


def _row(phase: str, batch: int, prompt_len: int, new_tokens: int, shape: str, sides: list[Side],
         timings: list[list[Timing]], speed: Callable[[Timing], float | None], keep_tokens: bool) -> PhaseRow:
    speeds = [[speed(t) for t in ts] for ts in timings]
    ratios = {}
    for side, sp in zip(sides[1:], speeds[1:]):
        per_rep = [a / b for a, b in zip(speeds[0], sp) if a is not None and b]
        if per_rep:
            ratios[side.name] = (statistics.median(per_rep), min(per_rep), max(per_rep))
    first = ratios.get(sides[1].name) if len(sides) > 1 else None
    ratio, ratio_range = (first[0], first[1:]) if first else (None, None)
    return PhaseRow(
        phase=phase, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, shape=shape,
        tok_per_s={s.name: (statistics.median(v) if (v := [x for x in sp if x is not None]) else None)
                   for s, sp in zip(sides, speeds)},
        ratio=ratio, ratio_range=ratio_range, ratios=ratios,
        tokens={s.name: (ts[0].tokens if keep_tokens else []) for s, ts in zip(sides, timings)})


def measure_paired(sides: list[Side], tokenizer, shapes: PhaseShapes,
                   progress: Callable[[PhaseRow], None] | None = None) -> list[PhaseRow]:
    """Warm each side up once per shape, then alternate the sides rep by rep (a burst of load on a shared
    machine hits both), for every prefill length, then every decode batch (one decode row and one e2e row
    per batch). `progress` gets each row as soon as it is measured."""
    if not sides or len({s.name for s in sides}) != len(sides):
        raise ValueError("measure_paired needs at least one side, each with its own name")
    if shapes.reps < 1 or shapes.new_tokens < 2 or shapes.prompt_len < 1 or min(shapes.batches, default=1) < 1 \
            or min(shapes.prefill_lens, default=1) < 1:
        raise ValueError(f"phase shapes out of range: {shapes}; use reps >= 1, new_tokens >= 2 and lengths and "
                         "batches >= 1")
    rows: list[PhaseRow] = []

    def emit(row: PhaseRow) -> None:
        rows.append(row)
        if progress is not None:
            progress(row)

    for n in shapes.prefill_lens:
        timings = _paired(sides, make_prompts(tokenizer, 1, n), 1, shapes.reps)
        emit(_row("prefill", 1, n, 1, f"1 x {n}-token prompt", sides, timings,
                  lambda t, n=n: _rate(n, t.prefill_s), keep_tokens=False))
    new = shapes.new_tokens
    for b in shapes.batches:
        timings = _paired(sides, make_prompts(tokenizer, b, shapes.prompt_len), new, shapes.reps)
        shape = f"batch {b}, {shapes.prompt_len}-token prompts, {new} new tokens"
        emit(_row("decode", b, shapes.prompt_len, new, shape, sides, timings,
                  lambda t, b=b: _rate(b * (new - 1), t.decode_s), keep_tokens=True))
        emit(_row("e2e", b, shapes.prompt_len, new, shape, sides, timings,
                  lambda t, b=b: _rate(b * new, t.total_s), keep_tokens=False))
    return rows
