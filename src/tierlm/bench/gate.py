"""The correctness gate: greedy tokens of each configuration diffed against the reference.

Every benchmark run decodes a fixed prompt set greedily (chat-formatted, EOS honoured) with the
reference config and with each other config, then compares token lists: exact matches, and the
first position where any prompt diverges. A faster wrong answer is a bug, so a configuration whose
divergent prompts exceed its tolerance (0 for exact features) is flagged. The repeated-token check
flags degenerate loops that a diff against a reference which loops too would miss: a pattern of
period 1..3 tokens that repeats for `min_run` tokens past its first occurrence. A config is also
flagged if it loops on more prompts than the reference does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

GATE_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about memory bandwidth.",
    "List three prime numbers greater than 20.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning, my friend' into Spanish.",
    "Give one tip for writing readable Python code.",
)


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

    def to_dict(self) -> dict:
        return asdict(self)


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
        reasons.append(f"{len(diverged)}/{len(reference)} prompts diverge (tolerance {tolerance})")
    if anomalies > ref_anomalies:
        reasons.append(f"repeated-token loops on {anomalies} prompts (reference: {ref_anomalies})")
    return GateResult(
        config=config, reference=reference_name, prompts=len(reference), exact_match=len(reference) - len(diverged),
        first_divergence=min((f for f in firsts if f is not None), default=None), diverged_prompts=diverged,
        repeat_anomalies=anomalies, reference_repeat_anomalies=ref_anomalies, tolerance=tolerance,
        flagged=bool(reasons), reason="; ".join(reasons) or "ok")


def gate_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    """The first n fixed gate prompts, chat-formatted where the model has a template, as token ids."""
    out = []
    for text in GATE_PROMPTS[:n]:
        if getattr(tokenizer, "has_chat_template", False):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            out.append(tokenizer.encode(text))
    return out


def engine_greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from an LLMEngine for every prompt, all submitted at once (EOS honoured)."""
    from tierlm.core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    ids = [engine.add_request(list(p), params, request_id=f"gate-{i}") for i, p in enumerate(prompts)]
    done: dict[str, list[int]] = {}
    try:
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
    finally:
        for rid in ids:
            if rid not in done:
                engine.abort_request(rid)
    return [done[i] for i in ids]
