"""The correctness gate: greedy tokens of each configuration diffed against references, on a prompt set
built to exercise what each configuration changes.

The gate set (`build_gate_set`), run in waves on an engine of its own (`gate_engine_config`):

    wave 1  all at once: chat prompts (short, chat-formatted) and long prompts cut from a shipped
            public-domain text (data/midsummer_act1.txt): A = text[0:L], B = text[0:L/2] + a later
            passage (shares A's first blocks), C = a passage of its own; mixed lengths in one batch
    wave 2  after wave 1 has finished: A again, B' = text[0:L/2] + another passage, the first chat prompt
            (their prefixes mostly still on the device: prefix hits)
    evict   passages of their own (at most L tokens each, more blocks in all than the pool holds), one wave
            each (one at a time: no preemption to pay for) and EVICT_TOKENS greedy tokens each (they are
            there to evict): they push every cached block of waves 1-2 out of the device pool (down to the
            lower tiers of a tiered config)
    last    A and B again: their prefixes are gone from the device, so a tiered config loads them back from
            host memory, disk or Redis (B: A's first half from the blocks A just loaded, the rest from a
            tier), and the others recompute them

    gate engine: a KV pool that holds wave 1's prompts, shared prefix blocks once, with one block to spare
    (so as soon as the requests decode past their last block, the youngest are preempted, and wave 2 finds
    part of its prefixes evicted; the gate table reports what each config's run exercised), a step budget of GATE_CHUNK tokens for configurations that chunk (so the long prompts are
    split at many chunk boundaries) and of all of wave 1's prompt tokens for those that do not (so they
    are admitted together).

So a chunk boundary off by one, a prefix hit on the wrong block, a preemption that loses state, an
eviction that leaves a stale hash or a tier load that writes KV into the wrong block all change greedy
tokens here (a tiered config's gate runs with its tiers: configs.gate_engine_config). Each configuration's tokens are
compared with the reference configuration's (baseline) and, when the transformers peer ran, with
transformers' greedy tokens on the same prompts (a reference outside tierlm). An exact configuration whose
divergent prompts exceed its tolerance (0) is flagged. A lossy one (FP8 KV: BenchConfig.lossy) is gated in
drift mode instead (LossyGate): the baseline's greedy gate replies are teacher-forced through both gate
engines (LLMEngine.score: the decode path) and the config must meet `tierlm drift`'s thresholds on top-1
agreement and KL, and answer passkey probes at least as well as the baseline; its exact diffs are reported,
not gated. The gate table says which mode each config used. The repeated-token check flags degenerate loops that a diff against a reference which
loops too would miss: a pattern of period 1..3 tokens that repeats for `min_run` tokens past its first
occurrence; a config is flagged if it loops on more prompts than the reference does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GATE_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about memory bandwidth.",
    "List three prime numbers greater than 20.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning, my friend' into Spanish.",
    "Give one tip for writing readable Python code.",
)
GATE_CHUNK = 64  # step token budget of chunking configurations in the gate
_POOL_BLOCK = 16  # block size the evict passages are sized for (a larger one only needs fewer tokens)
EVICT_TOKENS = 2  # greedy tokens of each evict passage (GateSet.caps)
TEXT_PATH = Path(__file__).with_name("data") / "midsummer_act1.txt"


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length mismatch diverges at the shorter length); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def has_repeat_anomaly(tokens: Sequence[int], min_run: int = 8, max_period: int = 3) -> bool:
    """True if some period-p pattern (p <= max_period) continues for min_run tokens past its first copy."""
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            if run >= min_run:
                return True
    return False


@dataclass
class GateResult:
    config: str
    reference: str
    prompts: int
    exact_match: int
    first_divergence: int | None  # earliest divergent position over all prompts
    diverged_prompts: list[int]
    repeat_anomalies: int
    reference_repeat_anomalies: int
    tolerance: int
    flagged: bool
    reason: str


def compare(config: str, reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]],
            tolerance: int = 0, reference_name: str = "baseline", min_run: int = 8) -> GateResult:
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate outputs for {len(reference)} reference outputs")
    firsts = [first_divergence(r, c) for r, c in zip(reference, candidate)]
    diverged = [i for i, f in enumerate(firsts) if f is not None]
    anomalies = sum(has_repeat_anomaly(c, min_run) for c in candidate)
    ref_anomalies = sum(has_repeat_anomaly(r, min_run) for r in reference)
    reasons = []
    if len(diverged) > tolerance:
        reasons.append(f"{len(diverged)}/{len(reference)} prompts diverge from {reference_name} (tolerance {tolerance})")
    if anomalies > ref_anomalies:
        reasons.append(f"repeated-token loops on {anomalies} prompts ({reference_name}: {ref_anomalies})")
    return GateResult(
        config=config, reference=reference_name, prompts=len(reference), exact_match=len(reference) - len(diverged),
        first_divergence=min((f for f in firsts if f is not None), default=None), diverged_prompts=diverged,
        repeat_anomalies=anomalies, reference_repeat_anomalies=ref_anomalies, tolerance=tolerance,
        flagged=bool(reasons), reason="; ".join(reasons) or "ok")


# ---- the prompt set ------------------------------------------------------------------------------------
@dataclass
class GateSet:
    """Each distinct prompt once (token ids, with a name), and the waves that run them (prompt indices)."""

    waves: list[list[int]]  # indices into `prompts`, per wave
    prompts: list[list[int]]
    names: list[str]
    caps: dict[int, int] = field(default_factory=dict)  # prompt index -> at most this many greedy tokens

    def max_tokens(self, i: int, max_tokens: int) -> int:
        """Greedy tokens prompt i asks for when the gate's is `max_tokens`."""
        return min(max_tokens, self.caps.get(i, max_tokens))

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.prompts)

    @property
    def first_wave_tokens(self) -> int:
        return sum(len(self.prompts[i]) for i in self.waves[0])

    @property
    def order(self) -> list[int]:
        """Prompt indices in run order (wave 1, then wave 2): the order of a run's token lists."""
        return [i for wave in self.waves for i in wave]


def gate_text_ids(tokenizer) -> list[int]:
    return tokenizer.encode(TEXT_PATH.read_text(encoding="utf-8"), add_special_tokens=False)


def chat_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    """The first n fixed chat prompts, chat-formatted where the model has a template, as token ids."""
    out = []
    for text in GATE_PROMPTS[:n]:
        if getattr(tokenizer, "has_chat_template", False):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            out.append(tokenizer.encode(text))
    return out


def build_gate_set(tokenizer, num_chat: int, long_len: int) -> GateSet:
    """The gate's prompts: `num_chat` chat prompts and, if long_len > 0, the long ones (see module docstring)."""
    prompts = chat_prompt_ids(tokenizer, num_chat)
    names = [f"chat-{i}" for i in range(len(prompts))]
    wave1 = list(range(len(prompts)))
    wave2 = [0] if prompts else []
    evict: list[list[int]] = []
    last: list[int] = []
    if long_len > 0:
        orig = gate_text_ids(tokenizer)
        half = long_len // 2
        # the evict passages allocate more blocks than the pool has (gate_pool_blocks: wave 1's blocks + 1,
        # or the longest sequence), so every block cached before them is popped off the free queue
        lens = [len(p) for p in prompts] + [long_len, long_len, long_len * 3 // 4]
        evict_tokens = sum(-(-n // _POOL_BLOCK) * _POOL_BLOCK for n in lens) + 2 * _POOL_BLOCK
        n_evict = -(-evict_tokens // long_len)
        evict_len = -(-evict_tokens // n_evict)  # <= long_len: each fits the pool alone
        text = list(orig)
        while len(text) < 3 * long_len + n_evict * (evict_len + 1):
            text = text + orig
        base = len(prompts)
        prompts += [text[:long_len],                                          # A
                    text[:half] + text[long_len: long_len + half],            # B: shares A's first half
                    text[2 * long_len: 2 * long_len + long_len * 3 // 4],     # C: a passage of its own
                    text[:half] + text[long_len + half: 2 * long_len]]        # B': shares it again, later
        names += ["long-A", "long-B", "long-C", "long-B2"]
        for j in range(n_evict):  # passages of their own (never starting where the text starts over)
            start = 3 * long_len + j * (evict_len + 1)
            start += start % len(orig) == 0
            prompts.append(text[start: start + evict_len])
            names.append(f"evict-{j}")
            evict.append([len(prompts) - 1])
        wave1 = [base, base + 1, base + 2] + wave1  # long ones first: still prefilling as the chats decode
        wave2 = [base] + wave2 + [base + 3]
        last = [base, base + 1]
    return GateSet(waves=[w for w in (wave1, wave2, *evict, last) if w], prompts=prompts, names=names,
                   caps={w[0]: EVICT_TOKENS for w in evict})


def gate_pool_blocks(gate: GateSet, max_tokens: int, block_size: int) -> int:
    """KV blocks of the gate engine: wave 1's prompts, their shared full prefix blocks counted once, plus one
    block, so that its requests, admitted together (sharing or not), must preempt as they decode, and
    wave 2 finds part of its prefixes evicted; never less than the longest sequence alone needs."""
    def blocks(n: int) -> int:
        return -(-n // block_size)

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    wave = [gate.prompts[i] for i in gate.waves[0]]  # (wave 3 holds more tokens: it evicts, and preempts)
    shared = sum(max((common(p, q) // block_size for q in wave[:k]), default=0) for k, p in enumerate(wave))
    pool = sum(blocks(len(p)) for p in wave) - shared + 1
    return max(pool, blocks(gate.longest + max_tokens))


def run_gate(engine, gate: GateSet, max_tokens: int) -> list[list[int]]:
    """Greedy tokens (EOS honoured) for every prompt of the set, wave by wave, in `gate.order`."""
    from tierlm.core.sampling_params import SamplingParams

    out: list[list[int]] = []
    for w, wave in enumerate(gate.waves):
        ids = [engine.add_request(list(gate.prompts[i]),
                                  SamplingParams(temperature=0.0, max_tokens=gate.max_tokens(i, max_tokens)),
                                  request_id=f"gate-{w}-{k}")
               for k, i in enumerate(wave)]
        done: dict[str, list[int]] = {}
        try:
            while len(done) < len(ids):
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = list(o.outputs[0].token_ids)
        finally:
            for rid in ids:
                if rid not in done:
                    engine.abort_request(rid)
        out += [done[rid] for rid in ids]
    return out


def in_order(gate: GateSet, per_prompt: Sequence[Sequence[int]]) -> list[list[int]]:
    """Tokens of the unique prompts (one list per prompt index) laid out in `gate.order`, each cut to its
    prompt's cap (`GateSet.caps`)."""
    return [list(per_prompt[i])[:gate.caps.get(i)] for i in gate.order]


# ---- lossy configurations: drift thresholds instead of exact tokens --------------------------------------
NEEDLE_LEN = 512  # passkey probes of the lossy gate: this many tokens, or what the gate engine's pool holds
MIN_NEEDLE_LEN = 128  # below this no passkey probe fits (the needle check is then n/a)
NEEDLES = 4
NEEDLE_TOKENS = 8


@dataclass
class LossyProbe:
    """What one gate engine produced on the lossy probe: teacher-forced logits of the reference's greedy
    gate continuations (one [n, vocab] tensor per unique prompt) and passkey replies."""

    logits: list
    needle_correct: list[bool]
    needle_length: int = 0  # 0: no passkey probe fit the gate engine

@dataclass
class LossyGate:
    """A lossy configuration's gate (FP8 KV and the like): instead of exact tokens, the drift thresholds of
    `tierlm drift` (drift/thresholds.py defaults) on what the gate can measure: top-1 agreement and KL
    (reference || config) over the teacher-forced positions of the reference's greedy gate replies, and
    passkey accuracy at NEEDLE_LEN tokens (config >= reference)."""

    positions: int
    top1_agreement: float
    kl_mean: float
    kl_p99: float
    needle_length: int  # 0: no passkey probe fit the gate engine (check n/a)
    needle_reference: float | None
    needle_candidate: float | None
    checks: list[dict]  # {"metric", "value", "threshold", "status"}
    flagged: bool
    reason: str


def lossy_probe(engine, gate: GateSet, reference_tokens: Sequence[Sequence[int]]) -> LossyProbe:
    """Run the probe on a gate engine: score each unique prompt's reference continuation (teacher forced,
    decode path) and answer NEEDLES passkey prompts greedily."""
    from tierlm.core.sampling_params import SamplingParams
    from tierlm.drift.inputs import needle_found, needles
    from tierlm.engine.llm import LLM

    per_prompt: dict[int, list[int]] = {}
    for i, toks in zip(gate.order, reference_tokens):
        if toks and i not in per_prompt:
            per_prompt[i] = list(toks)
    idx = sorted(per_prompt)
    logits = engine.score([list(gate.prompts[i]) for i in idx], [per_prompt[i] for i in idx])
    length = min(NEEDLE_LEN, engine.max_model_len - 1)
    if length < MIN_NEEDLE_LEN:
        return LossyProbe(logits, [], 0)
    probes = needles(engine.tokenizer, [length], NEEDLES, NEEDLE_TOKENS)
    replies = LLM.for_engine(engine).generate([list(n.prompt) for n in probes],
                                              SamplingParams(temperature=0.0, max_tokens=NEEDLE_TOKENS))
    return LossyProbe(logits, [needle_found(n.key, r.outputs[0].text) for n, r in zip(probes, replies)], length)


def lossy_compare(reference: LossyProbe, candidate: LossyProbe, thresholds=None) -> LossyGate:
    import torch

    from tierlm.drift.metrics import kl_divergence, top1_matches
    from tierlm.drift.thresholds import Thresholds

    th = thresholds or Thresholds()
    kl = torch.cat([kl_divergence(a, b) for a, b in zip(reference.logits, candidate.logits)])
    agree = torch.cat([top1_matches(a, b) for a, b in zip(reference.logits, candidate.logits)])
    top1 = float(agree.double().mean()) if agree.numel() else 1.0
    kl_mean = float(kl.mean()) if kl.numel() else 0.0
    kl_p99 = float(torch.quantile(kl, 0.99)) if kl.numel() else 0.0
    needle = reference.needle_length if reference.needle_length == candidate.needle_length else 0
    ref_acc = sum(reference.needle_correct) / len(reference.needle_correct) if needle else None
    cand_acc = sum(candidate.needle_correct) / len(candidate.needle_correct) if needle else None
    checks = [th.check("top1_agreement", top1), th.check("kl_mean", kl_mean), th.check("kl_p99", kl_p99),
              th.check(f"needle_drop@{needle}", ref_acc - cand_acc if needle else None)]
    failed = [c for c in checks if not c.passed]
    return LossyGate(
        positions=int(kl.numel()), top1_agreement=top1, kl_mean=kl_mean, kl_p99=kl_p99, needle_length=needle,
        needle_reference=ref_acc, needle_candidate=cand_acc,
        checks=[{"metric": c.metric, "value": c.value, "threshold": c.threshold_text, "status": c.status}
                for c in checks],
        flagged=bool(failed), reason="; ".join(c.describe() for c in failed) or "ok")


@dataclass
class ConfigGate:
    """A configuration's gate: against the reference configuration and, when it ran, against transformers.

    The transformers comparison gates only in fp32, where both sides compute the same sums up to ordering
    and greedy tokens must match; in bf16/fp16 it is advisory (reported, never flagging), since two
    implementations round differently and a divergence says nothing about which one is wrong."""

    config: str
    tokens: list[list[int]]
    vs_reference: GateResult | None = None
    vs_transformers: GateResult | None = None
    transformers_advisory: bool = False
    engine: dict = field(default_factory=dict)  # the gate engine's pool, step budget and what it exercised
    lossy: LossyGate | None = None  # a lossy config: the drift-threshold gate that decides (exact diffs advisory)

    @property
    def mode(self) -> str:
        return "lossy (drift thresholds)" if self.lossy is not None else "exact"

    def _gating(self) -> list[GateResult]:
        if self.lossy is not None:
            return []
        return [g for g in (self.vs_reference, None if self.transformers_advisory else self.vs_transformers)
                if g is not None]

    @property
    def flagged(self) -> bool:
        return any(g.flagged for g in self._gating()) or (self.lossy is not None and self.lossy.flagged)

    @property
    def reason(self) -> str:
        reasons = [g.reason for g in self._gating() if g.flagged]
        if self.lossy is not None and self.lossy.flagged:
            reasons.append(f"lossy gate: {self.lossy.reason}")
        return "; ".join(reasons) or "ok"
