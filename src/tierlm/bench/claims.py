"""`tierlm bench --claims`: the representative load test for the headline claims ("40% less memory", "1.8x
faster"), run as hypotheses on this machine.

Two engines side by side in one process: the reference (config `baseline`: dense, device-only KV in the
model dtype, no prefix cache, no chunking) and `v4` (prefix cache + chunked prefill + host/disk KV tiers +
sparse decoding whose blocks FP8 index keys pick, over KV in the model dtype: bench/configs.py;
--claims-config names another candidate, such as `v4-fp8`, the first v4 with FP8 KV and Quest's picks).
For every cell of a grid of context lengths x concurrency (full: 1K, 2K, 4K, 8K x 1, 4, 16; --quick: 1K,
2K x 1, 4), `concurrency` prompts of `context - new_tokens` tokens (distinct windows of the shipped public-domain text; fresh windows in every rep, so no cell gets
prefix-cache hits: cold prefill) generate `new_tokens` greedy tokens each (so a sequence ends at `context`), all admitted at once, the two sides taking turns rep
by rep (the order rotates). Per cell:

    memory (reduction = 1 - v4 / reference)
      kv           device KV in use at the run's peak: blocks referenced x bytes per block (data, scales and
                   the selector's block metadata: index keys or key bounds)
      activations  peak bytes torch allocated while one prompt of the cell's context is prefilled (every
                   prefill step: v4's chunks too), beyond weights and KV; measured once per context
      weights      resident parameter bytes (v4 does not quantize weights: 0% by construction)
      total        kv + activations + weights: the engine's working set for the cell (the process's RSS is
                   shared by both engines here, so it cannot be split)
    speed (speed-up = v4 / reference; median of the per-rep ratios)
      prefill      concurrency x prompt tokens / time until every request has its first token (sequences
                   that have theirs decode meanwhile, as a server would run them)
      decode       concurrency x (new_tokens - 1) / the next new_tokens - 1 steps, each checked to decode
                   every sequence and prefill nothing (the full batch; sequences may generate up to
                   `headroom` tokens beyond new_tokens, so none finishes early; prompts are shortened by
                   that headroom so every sequence stays within `context`)
      e2e          concurrency x new_tokens / (prefill + decode time): until every sequence has new_tokens

The drift gate runs on `v4` in the same run, per context: the reference's greedy continuations of the first
prompts of the largest-concurrency cell are teacher-forced through both engines (LLMEngine.score: decode steps,
so sparse picks and FP8 reads count) for top-1 agreement and KL (reference || v4), and passkey probes of that
context are answered by both. v4 is flagged when top-1 agreement is below MIN_TOP1 or it finds fewer
passkeys than the reference; a flagged v4's figures do not count (exit 1). Every cell also diffs greedy
tokens (reported: v4 is lossy by design).

Outputs (bench/claims_report.py): a table per metric (rows: context, columns: concurrency), a verdict line per
claim and component (where 40% / 1.8x hold and where not), a heatmap PNG per metric, OUT/claims.md and --json.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

MEMORY_CLAIM = 0.40  # "40% less memory"
SPEED_CLAIM = 1.8  # "1.8x faster"
MIN_TOP1 = 0.95  # v4's drift gate: top-1 agreement with the reference on teacher-forced continuations
MEMORY_METRICS = ("kv", "activations", "weights", "total")
SPEED_METRICS = ("prefill", "decode", "e2e")
SIDES = ("reference", "v4")
PROMPT_STRIDE = 97  # token offset between prompt windows (no two prompts share a first block)


@dataclass(frozen=True)
class ClaimsPlan:
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    concurrency: tuple[int, ...] = (1, 4, 16)
    new_tokens: int = 32
    reps: int = 2
    sparse_budget: int = 1024  # v4's sparse budget in tokens
    config: str = "v4"  # the candidate side's bench config (bench/configs.py), reported as "v4"
    drift_prompts: int = 4  # teacher-forced continuations per context (v4's drift gate)
    needles: int = 4  # passkey probes per context
    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    out_dir: Path = Path("bench-out")
    json_path: Path | None = None
    plots: bool = True
    quick: bool = False

    def check(self) -> None:
        from tierlm.core.errors import InvalidParameterError

        if not self.contexts or min(self.contexts) < 128:
            raise InvalidParameterError(f"claims contexts {list(self.contexts)}: each must be >= 128 tokens",
                                        "use --claims-contexts 1024 2048 4096 8192")
        if not self.concurrency or min(self.concurrency) < 1:
            raise InvalidParameterError(f"claims concurrency {list(self.concurrency)}: each must be >= 1",
                                        "use --concurrency 1 4 16")
        if self.new_tokens < 2 or self.reps < 1 or self.drift_prompts < 1 or self.needles < 0:
            raise InvalidParameterError("claims: new tokens must be >= 2, reps and drift prompts >= 1",
                                        "use the defaults")
        from tierlm.bench.configs import get_config

        get_config(self.config)  # an unknown name: one line listing the known ones


QUICK = dict(contexts=(1024, 2048), concurrency=(1, 4), new_tokens=16, reps=1, drift_prompts=2, needles=1)


@dataclass
class Cell:
    context: int
    concurrency: int
    memory: dict[str, dict[str, int | None]]  # metric -> side -> bytes
    speed: dict[str, dict[str, float | None]]  # metric -> side -> median tok/s
    memory_reduction: dict[str, float | None]  # metric -> 1 - v4 / reference
    speedup: dict[str, float | None]  # metric -> median of per-rep v4 / reference
    speedup_range: dict[str, tuple[float, float] | None]
    greedy_same: int  # v4 sequences (first rep) whose greedy tokens equal the reference's
    sequences: int


@dataclass
class DriftRow:
    context: int
    positions: int
    top1_agreement: float
    kl_mean: float
    kl_p99: float
    needles_reference: float | None
    needles_v4: float | None
    flagged: bool
    reason: str


@dataclass
class ClaimsResult:
    command: str
    plan: dict
    engines: dict = field(default_factory=dict)  # side -> what it runs (KV format, bytes/token, sparse, tiers)
    cells: list[Cell] = field(default_factory=list)
    drift: list[DriftRow] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    complete: bool = False

    @property
    def flagged(self) -> bool:
        return any(d.flagged for d in self.drift)

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


# ---- engines ---------------------------------------------------------------------------------------------
def _configs(plan: ClaimsPlan, tiers):
    """(reference EngineConfig, v4 EngineConfig): pools that hold the largest cell, the same token capacity."""
    from tierlm.bench.configs import engine_config, reference_config

    bs = 16
    per_seq = -(-(max(plan.contexts) + 1) // bs)
    blocks = max(plan.concurrency) * per_seq + max(plan.concurrency) + 8
    # The reference prefills whole prompts (no chunking): its step budget holds the longest prompt next to
    # every other sequence's decode token, so a prompt is admitted while the others decode (with the
    # budget at exactly the prompt length, decodes would keep it out until they finish).
    ref = reference_config(plan.model, plan.dtype, plan.device, None, 1, max(plan.concurrency), 512,
                           max(plan.contexts) + max(plan.concurrency))
    ref = replace(ref, cache=replace(ref.cache, num_blocks=blocks, memory_bytes=None))
    if tiers is None:
        return ref, None
    v4 = engine_config(plan.config, ref, 512, tiers)
    if v4.sparse.enabled:  # a dense candidate (--claims-config fp8, say) stays dense
        v4 = replace(v4, sparse=replace(v4.sparse, budget_tokens=plan.sparse_budget))
    return ref, v4


def _describe(engine, config) -> dict:
    from tierlm.bench.memory import weight_bytes

    storage = engine.kv_storage
    sp = config.sparse
    return {"kv_format": engine.candidate_kv_format,
            "kv_bytes_per_token": engine.kv_spec.bytes_per_token,
            "kv_bytes_per_block": storage.nbytes // storage.num_blocks,
            "attention_backend": engine.attention_backend.name, "prefix_caching": config.cache.enable_prefix_caching,
            "chunked_prefill": config.scheduler.enable_chunked_prefill,
            "sparse": (f"{sp.selector}: budget {sp.budget_tokens} tokens (sink {sp.sink_tokens}, window "
                       f"{sp.window_tokens}), first {sp.dense_layers} layers dense") if sp.enabled else "dense",
            "lower_tiers": [t for t, on in (("host", config.tiers.host_memory_bytes), ("disk", config.tiers.disk_dir),
                                            ("redis", config.tiers.redis_url)) if on],
            "weights_bytes": weight_bytes(engine.model)[0], "num_blocks": storage.num_blocks}


# ---- prompts ---------------------------------------------------------------------------------------------
class PromptSource:
    """Distinct windows of the shipped text (repeated as needed); every call takes fresh windows."""

    def __init__(self, tokenizer, longest: int, total: int):
        from tierlm.bench.gate import gate_text_ids

        ids = gate_text_ids(tokenizer)
        need = longest + PROMPT_STRIDE * (total + 1)
        while len(ids) < need:
            ids = ids + ids
        self.ids = ids
        self.next = 0

    def take(self, n: int, length: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            start = (self.next * PROMPT_STRIDE) % max(1, len(self.ids) - length)
            out.append(self.ids[start:start + length])
            self.next += 1
        return out


# ---- measuring -------------------------------------------------------------------------------------------
@dataclass
class _Gen:
    prefill_s: float
    decode_s: float
    tokens: list[list[int]]
    peak_kv_blocks: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def prompt_len(context: int, concurrency: int, new_tokens: int) -> int:
    """A cell's prompt length: every sequence ends within `context` tokens, counting the decode phase and the
    headroom of tokens it may make while the others prefill."""
    p = context - new_tokens
    return max(16, p - headroom(concurrency, p))


def headroom(concurrency: int, prompt_len: int, chunk: int = 512) -> int:
    """Tokens a sequence may make before the last of the cell's sequences has its first token: one per step
    while the others prefill (at most one step per `chunk` prompt tokens each, plus one per sequence)."""
    return concurrency * (-(-prompt_len // chunk) + 1) + 2


def _generate(engine, prompts: list[list[int]], new_tokens: int, extra: int = 0) -> _Gen:
    """Two phases, one engine loop: admit every prompt (greedy, EOS ignored, `new_tokens + extra` allowed), step
    until every sequence has its first token (prefill: the batch's time to first token), then exactly
    `new_tokens - 1` steps, each checked to decode every sequence and prefill nothing (decode at the full
    batch). `extra` must cover the tokens early sequences make during the prefill phase (`headroom`), so
    none finishes inside the decode phase. The sequences are aborted at the end; their first `new_tokens`
    tokens are returned."""
    from tierlm.bench.engine_driver import greedy
    from tierlm.bench.phases import _sync

    kv = engine.kv
    _sync(engine.device)
    t0 = time.perf_counter()
    rids = [engine.add_request(list(p), greedy(new_tokens + extra)) for p in prompts]
    reqs = [engine.groups[r].seqs[0].request for r in rids]
    peak = 0
    while any(not r.output_token_ids for r in reqs):
        engine.step()
        peak = max(peak, kv.num_blocks - kv.num_free_blocks)
        if engine.last_step is None:
            raise RuntimeError("claims: the engine stopped scheduling before every prompt was prefilled")
    _sync(engine.device)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        engine.step()
        peak = max(peak, kv.num_blocks - kv.num_free_blocks)
        s = engine.last_step
        if s is None or s.decode_tokens != len(prompts) or s.prefill_tokens:
            raise RuntimeError(f"claims: a decode-phase step was not a full-batch decode ({s}); raise the headroom")
    _sync(engine.device)
    t2 = time.perf_counter()
    tokens = [list(r.output_token_ids[:new_tokens]) for r in reqs]
    for r in rids:
        engine.abort_request(r)
    return _Gen(t1 - t0, t2 - t1, tokens, peak)


def _ratio(a, b):
    return a / b if a is not None and b else None


def measure_cell(engines: dict, info: dict, source: PromptSource, context: int, concurrency: int,
                 plan: ClaimsPlan, activations: dict[str, int | None], keep: dict | None = None) -> Cell:
    """One cell: `reps` generations per side, alternating (order rotates per rep), fresh prompts each rep."""
    gens: dict[str, list[_Gen]] = {s: [] for s in SIDES}
    first_prompts = None
    for rep in range(plan.reps):
        prompts = source.take(concurrency, prompt_len(context, concurrency, plan.new_tokens))
        first_prompts = first_prompts or prompts
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        for side in order:
            gens[side].append(_generate(engines[side], prompts, plan.new_tokens,
                                        headroom(concurrency, len(prompts[0]))))
    if keep is not None:
        keep.update(prompts=first_prompts, tokens=gens["reference"][0].tokens)
    n, new = concurrency, plan.new_tokens
    plen = len(first_prompts[0])
    work = {"prefill": (lambda g: n * plen / g.prefill_s), "decode": (lambda g: n * (new - 1) / g.decode_s),
            "e2e": (lambda g: n * new / g.total_s)}
    speed, speedup, spread = {}, {}, {}
    for m, f in work.items():
        per = {s: [f(g) for g in gens[s]] for s in SIDES}
        speed[m] = {s: statistics.median(v) for s, v in per.items()}
        ratios = [a / b for a, b in zip(per["v4"], per["reference"])]
        speedup[m] = statistics.median(ratios)
        spread[m] = (min(ratios), max(ratios))
    memory: dict[str, dict[str, int | None]] = {}
    memory["kv"] = {s: max(g.peak_kv_blocks for g in gens[s]) * info[s]["kv_bytes_per_block"] for s in SIDES}
    memory["activations"] = dict(activations)
    memory["weights"] = {s: info[s]["weights_bytes"] for s in SIDES}
    memory["total"] = {s: (None if memory["activations"][s] is None else
                           memory["kv"][s] + memory["activations"][s] + memory["weights"][s]) for s in SIDES}
    reduction = {m: (None if (r := _ratio(memory[m]["v4"], memory[m]["reference"])) is None else 1.0 - r)
                 for m in MEMORY_METRICS}
    same = sum(a == b for a, b in zip(gens["v4"][0].tokens, gens["reference"][0].tokens))
    return Cell(context, concurrency, memory, speed, reduction, speedup, spread, same, n)


def drift_check(engines: dict, context: int, prompts: list[list[int]], tokens: list[list[int]],
                needles: int) -> DriftRow:
    """v4's drift gate at one context (module docstring)."""
    import torch

    from tierlm.drift.inputs import needle_found
    from tierlm.drift.inputs import needles as make_needles
    from tierlm.drift.metrics import kl_divergence, top1_matches

    logits = {s: engines[s].score(prompts, tokens) for s in SIDES}
    kl = torch.cat([kl_divergence(a, b) for a, b in zip(logits["reference"], logits["v4"])])
    agree = torch.cat([top1_matches(a, b) for a, b in zip(logits["reference"], logits["v4"])])
    top1 = float(agree.double().mean())
    found: dict[str, float | None] = {s: None for s in SIDES}
    if needles:
        probes = make_needles(engines["reference"].tokenizer, [context], needles, 8)
        for s in SIDES:
            replies = _greedy_texts(engines[s], [p.prompt for p in probes], 8)
            found[s] = sum(needle_found(p.key, r) for p, r in zip(probes, replies)) / len(probes)
    reasons = []
    if top1 < MIN_TOP1:
        reasons.append(f"top-1 agreement {top1:.3f} < {MIN_TOP1}")
    if found["v4"] is not None and found["v4"] < found["reference"]:
        reasons.append(f"passkeys found {found['v4']:.2f} < reference {found['reference']:.2f}")
    return DriftRow(context, int(kl.numel()), top1, float(kl.mean()), float(torch.quantile(kl, 0.99)),
                    found["reference"], found["v4"], bool(reasons), "; ".join(reasons) or "ok")


def _greedy_texts(engine, prompts: list[list[int]], max_tokens: int) -> list[str]:
    from tierlm.core.sampling_params import SamplingParams
    from tierlm.engine.llm import LLM

    replies = LLM.for_engine(engine).generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [r.outputs[0].text for r in replies]


# ---- verdicts --------------------------------------------------------------------------------------------
def _where(cells: list[Cell]) -> str:
    return ", ".join(f"{c.context // 1024 if c.context % 1024 == 0 else c.context}{'K' if c.context % 1024 == 0 else ''}"
                     f"/c{c.concurrency}" for c in cells)


def _less(reduction: float) -> str:
    """0.25 -> "25% less", -0.13 -> "13% more"."""
    return f"{reduction:.0%} less" if reduction >= 0 else f"{-reduction:.0%} more"


def verdicts(cells: list[Cell], drift: list[DriftRow]) -> list[str]:
    """One line per claim component: in how many cells it holds, the best and worst cell, and where."""
    lines = []
    for m in MEMORY_METRICS:
        vals = [(c, c.memory_reduction[m]) for c in cells if c.memory_reduction[m] is not None]
        lines.append(_verdict(f"40% less memory, {m}", vals, lambda v: v >= MEMORY_CLAIM, _less))
    for m in SPEED_METRICS:
        vals = [(c, c.speedup[m]) for c in cells if c.speedup[m] is not None]
        lines.append(_verdict(f"1.8x faster, {m}", vals, lambda v: v >= SPEED_CLAIM, lambda v: f"{v:.2f}x"))
    if drift:
        bad = [d for d in drift if d.flagged]
        lines.append("drift gate on v4: " + ("FLAGGED at " + "; ".join(f"{d.context}: {d.reason}" for d in bad)
                                             + " (its figures do not count)" if bad else
                                             "holds at every context (top-1 >= "
                                             f"{MIN_TOP1}, passkeys found >= reference): "
                                             + ", ".join(f"{d.context}: top-1 {d.top1_agreement:.3f}" for d in drift)))
    return lines


def _verdict(name: str, vals, holds, fmt) -> str:
    if not vals:
        return f"{name}: not measured"
    ok = [c for c, v in vals if holds(v)]
    best = max(vals, key=lambda cv: cv[1])
    worst = min(vals, key=lambda cv: cv[1])
    head = ("HOLDS in every cell" if len(ok) == len(vals) else "DOES NOT HOLD in any cell" if not ok
            else f"holds in {len(ok)}/{len(vals)} cells ({_where(ok)})")
    return (f"{name}: {head}; best {fmt(best[1])} at {_where([best[0]])}, worst {fmt(worst[1])} at "
            f"{_where([worst[0]])}")


# ---- the run ---------------------------------------------------------------------------------------------
def run_claims(plan: ClaimsPlan, command: str, progress=print) -> ClaimsResult:
    """Build both engines, measure every cell (and v4's drift gate per context), fill a ClaimsResult. Ctrl-C
    stops the run and returns what was measured (complete False)."""
    from types import SimpleNamespace

    from tierlm.bench.engine_driver import release_tiers
    from tierlm.bench.memory import activation_peak_bytes
    from tierlm.bench.tiers import BenchTiers
    from tierlm.config import TierConfig
    from tierlm.engine.llm_engine import LLMEngine

    plan.check()
    result = ClaimsResult(command=command, plan={k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in asdict(plan).items()})
    ref_cfg, _ = _configs(plan, None)
    engines: dict = {}
    tiers = None
    try:
        progress("claims: loading the reference engine")
        engines["reference"] = LLMEngine(ref_cfg)
        v4_pool = _v4_pool_bytes(engines["reference"], ref_cfg)
        tiers = BenchTiers(SimpleNamespace(tiers=TierConfig(host_memory_bytes=v4_pool, disk_bytes=2 * v4_pool),
                                           kv_memory=v4_pool), ("host", "disk"))
        tiers.open()
        _, v4_cfg = _configs(plan, tiers.for_engine())
        progress("claims: loading v4")
        engines["v4"] = LLMEngine(v4_cfg)
        result.engines = {"reference": _describe(engines["reference"], ref_cfg), "v4": _describe(engines["v4"], v4_cfg)}
        tok = engines["reference"].tokenizer
        cells_total = len(plan.contexts) * len(plan.concurrency) * plan.reps
        source = PromptSource(tok, max(plan.contexts), sum(plan.concurrency) * plan.reps * len(plan.contexts) + 64)
        for side in SIDES:  # warm-up: first-call allocations and kernels, untimed
            _generate(engines[side], source.take(1, 256), 4, headroom(1, 256))
        for ctx in plan.contexts:
            act = {s: activation_peak_bytes(engines[s], source.take(1, ctx - plan.new_tokens)[0]) for s in SIDES}
            keep: dict = {}
            for n in plan.concurrency:
                t0 = time.perf_counter()
                cell = measure_cell(engines, result.engines, source, ctx, n, plan, act,
                                    keep if n == max(plan.concurrency) else None)
                result.cells.append(cell)
                progress(f"claims: {ctx} tokens x {n}: decode {cell.speedup['decode']:.2f}x, prefill "
                         f"{cell.speedup['prefill']:.2f}x, KV {_less(cell.memory_reduction['kv'])} "
                         f"({time.perf_counter() - t0:.0f} s; {len(result.cells) * plan.reps}/{cells_total})")
            k = min(plan.drift_prompts, len(keep["prompts"]))
            row = drift_check(engines, ctx, keep["prompts"][:k], keep["tokens"][:k], plan.needles)
            result.drift.append(row)
            progress(f"claims: drift gate at {ctx}: top-1 {row.top1_agreement:.3f}, KL {row.kl_mean:.4f}, "
                     f"passkeys {row.needles_v4} vs {row.needles_reference}: {'FLAG' if row.flagged else 'ok'}")
        result.complete = True
    except KeyboardInterrupt:
        result.notes.append("interrupted (Ctrl-C): the cells measured so far")
    finally:
        result.verdicts = verdicts(result.cells, result.drift)
        if "v4" in engines:
            release_tiers(engines["v4"])
        if tiers is not None:
            tiers.close()
    return result


def _v4_pool_bytes(reference, ref_cfg) -> int:
    """v4's device pool in bytes (the same blocks as the reference, in FP8 with selector metadata): sizes its
    host tier (one pool) and disk tier (two)."""
    from tierlm.kvcache.spec import KVSpec

    spec = KVSpec.from_model(reference.model_config, "fp8_e4m3", ref_cfg.cache.block_size)
    meta = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4  # quest key bounds per block
    return ref_cfg.cache.num_blocks * (spec.page_size_bytes + meta)
