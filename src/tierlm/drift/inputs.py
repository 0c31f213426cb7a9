"""The inputs of a drift run, built once from the tokenizer and fed to both sides unchanged.

    held-out passages   N windows of P + C tokens, evenly spaced over the shipped public-domain text(s)
                        (bench/data/midsummer_act1.txt, its two header lines dropped; repeated when the text is
                        shorter than one window): the first P tokens are the prompt, the next C the continuation
                        that both sides score teacher-forced.
    greedy prompts      drift/data/chat_prompts.txt, chat-formatted with the model's template when it has one.
    needles             per context length L, K passkey prompts of exactly L - gen tokens (gen = the greedy tokens
                        asked for, so prompt + reply fit in L): filler from the same text, the needle sentence
                        inserted after a line break at depth (k + 0.5) / K, then the question.
    safety prompts      drift/data/safety_prompts.jsonl ({"kind": "harmful" | "benign", "prompt": ...}),
                        interleaved so any leading slice holds both kinds; chat-formatted like the greedy ones.

    needle prompt:  [filler ........ \\n| NEEDLE | filler .......... | QUESTION ]   <- L - gen tokens
                                       ^ depth (k + 0.5) / K of the filler, snapped back to a line start
"""
from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tierlm.core.errors import InvalidParameterError

DATA = Path(__file__).with_name("data")
CHAT_PROMPTS = DATA / "chat_prompts.txt"
SAFETY_PROMPTS = DATA / "safety_prompts.jsonl"
TEXTS = (Path(__file__).parents[1] / "bench" / "data" / "midsummer_act1.txt",)
TEXT_HEADER_LINES = 2  # each shipped text opens with a title line and a note about it
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Passage:
    prompt: list[int]
    continuation: list[int]
    start: int  # token offset in the corpus


@dataclass(frozen=True)
class Needle:
    length: int  # the context length L this prompt is built for
    key: str  # five digits
    depth: float  # where the needle sits in the filler, 0..1
    prompt: list[int]


@dataclass(frozen=True)
class SafetyPrompt:
    kind: str  # "harmful" | "benign"
    text: str
    prompt: list[int]


@dataclass
class SuiteInputs:
    passages: list[Passage] = field(default_factory=list)
    greedy: list[list[int]] = field(default_factory=list)
    greedy_texts: list[str] = field(default_factory=list)
    needles: list[Needle] = field(default_factory=list)
    safety: list[SafetyPrompt] = field(default_factory=list)


def corpus_text() -> str:
    parts = []
    for path in TEXTS:
        lines = path.read_text(encoding="utf-8").splitlines()
        parts.append("\n".join(lines[TEXT_HEADER_LINES:]).strip())
    return "\n\n".join(parts)


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        return [bos, *ids]
    return ids


def corpus_ids(tokenizer, at_least: int = 0) -> list[int]:
    """The corpus as token ids, repeated (joined by a blank line) until it holds `at_least` tokens."""
    once = tokenizer.encode(corpus_text(), add_special_tokens=False)
    gap = tokenizer.encode("\n\n", add_special_tokens=False)
    ids = list(once)
    while len(ids) < at_least:
        ids += gap + once
    return ids


def passages(tokenizer, n: int, prompt_tokens: int, continuation_tokens: int) -> list[Passage]:
    """n windows of prompt_tokens + continuation_tokens, starts evenly spaced over the corpus."""
    window = prompt_tokens + continuation_tokens
    ids = corpus_ids(tokenizer, window)
    span = len(ids) - window
    out = []
    for i in range(n):
        start = round(i * span / (n - 1)) if n > 1 else 0
        w = ids[start: start + window]
        out.append(Passage(_with_bos(tokenizer, w[:prompt_tokens]), w[prompt_tokens:], start))
    return out


def render_chat(tokenizer, text: str) -> list[int]:
    """A user message as prompt ids: the model's chat template when it has one, else the plain text."""
    if getattr(tokenizer, "has_chat_template", False):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)
    return tokenizer.encode(text)


def chat_prompt_texts() -> list[str]:
    lines = CHAT_PROMPTS.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def safety_prompt_rows() -> list[dict]:
    rows = []
    for n, line in enumerate(SAFETY_PROMPTS.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if row.get("kind") not in ("harmful", "benign") or not row.get("prompt"):
                raise ValueError(f"{SAFETY_PROMPTS}:{n}: needs kind harmful|benign and a prompt")
            rows.append(row)
    return rows


def _pick(items: list, n: int, what: str, flag: str) -> list:
    if n > len(items):
        raise InvalidParameterError(f"{n} {what} asked for, {len(items)} are shipped", f"use {flag} {len(items)} or fewer")
    return items[:n]


def needle_key(length: int, k: int) -> str:
    """Five digits, fixed per (length, k)."""
    return str(random.Random(f"tierlm-drift-needle-{length}-{k}").randint(10000, 99999))


def needles(tokenizer, lengths: list[int], per_length: int, gen_tokens: int) -> list[Needle]:
    """per_length passkey prompts for every length (see the module docstring)."""
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    bos = _with_bos(tokenizer, [])
    longest = max(lengths, default=0)
    filler = corpus_ids(tokenizer, longest)
    line_starts = [i + 1 for i, t in enumerate(filler) if "\n" in tokenizer.decode([t], skip_special_tokens=False)]
    out = []
    for length in lengths:
        for k in range(per_length):
            key = needle_key(length, k)
            needle = tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)
            n_fill = length - gen_tokens - len(bos) - len(needle) - len(question)
            if n_fill < 1:
                raise InvalidParameterError(f"needle length {length} leaves no room for filler text",
                                            "use --needle-lengths of at least 128")
            depth = (k + 0.5) / per_length
            at = round(depth * n_fill)
            j = bisect.bisect_right(line_starts, at) - 1
            at = line_starts[j] if j >= 0 and line_starts[j] <= n_fill else at
            prompt = bos + filler[:at] + needle + filler[at:n_fill] + question
            out.append(Needle(length, key, at / n_fill, prompt))
    return out


def needle_found(key: str, reply: str) -> bool:
    """The reply names the key (its digits in a row; spaces between them are ignored)."""
    return key in reply.replace(" ", "")


def build_inputs(tokenizer, sizes) -> SuiteInputs:
    """Every input of a drift run at these sizes (drift.suite.Sizes)."""
    texts = _pick(chat_prompt_texts(), sizes.greedy_prompts, "greedy prompts", "--greedy-prompts")
    rows = _pick(safety_prompt_rows(), sizes.safety_prompts, "safety prompts", "--safety-prompts")
    return SuiteInputs(
        passages=passages(tokenizer, sizes.passages, sizes.prompt_tokens, sizes.continuation_tokens),
        greedy=[render_chat(tokenizer, t) for t in texts], greedy_texts=texts,
        needles=needles(tokenizer, list(sizes.needle_lengths), sizes.needles, sizes.needle_tokens),
        safety=[SafetyPrompt(r["kind"], r["prompt"], render_chat(tokenizer, r["prompt"])) for r in rows])
