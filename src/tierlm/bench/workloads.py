"""Workloads: seeded, offline request sets with a documented shape and size knobs.

A workload is named on the command line as `NAME` or `NAME:knob=value,knob=value`, for example
`multi-turn:users=8,rounds=4` or `fixed:isl=1024,osl=64,prefix=512`. Give several to sweep.

Prompt text is drawn from a fixed word list with `random.Random(seed)`, tokenized, and cut to an
exact token count, so the same seed gives the same token ids on every machine (for a given
tokenizer). Output lengths are exact too: the drivers ask for greedy decoding with EOS ignored.

    short-chat    n requests: shared system prompt (sys tokens) + a user turn of lo..hi tokens,
                  replies of lo..hi tokens
    fixed         n requests of exactly isl input / osl output tokens; the first `prefix` input
                  tokens are shared by all (0: none)
    long-doc-qa   docs x questions: each prompt is one document (doc tokens) + one question
                  (q tokens); question-major order (every document's first question, then every
                  second one) so reuse distance spans all the documents
    multi-turn    users x rounds: shared system prompt, each round's prompt is the whole history
                  (earlier user turns + synthetic assistant replies of osl tokens) + a new user
                  turn; round-robin order across users
    batch-gen     n short prompts, long outputs (synthetic-data jobs)
    trace         replay of a Mooncake-style JSONL trace (see trace.py)
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tierlm.bench.trace import build_trace
from tierlm.core.errors import InvalidParameterError


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float | None = None  # offset from the run start (trace replay); None: the arrival plan decides
    tag: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


@dataclass
class Workload:
    name: str
    spec: str  # the command-line spec that built it, knobs resolved
    shape: str  # one human line: sizes that make the numbers mean something
    requests: list[BenchRequest] = field(default_factory=list)

    @property
    def max_prompt_len(self) -> int:
        return max((len(r.prompt_ids) for r in self.requests), default=0)

    @property
    def max_seq_len(self) -> int:
        return max((r.num_tokens for r in self.requests), default=0)

    @property
    def timed(self) -> bool:
        return bool(self.requests) and all(r.arrival_s is not None for r in self.requests)

    @property
    def shared_prefix_tokens(self) -> int:
        """Leading tokens every request's prompt shares (a system prompt, a common prefix): measured from
        the token ids, not declared by the generator."""
        prompts = [r.prompt_ids for r in self.requests]
        if not prompts:
            return 0
        n = min(len(p) for p in prompts)
        first = prompts[0]
        for i in range(n):
            if any(p[i] != first[i] for p in prompts[1:]):
                return i
        return n


_WORDS = (
    "the memory of a machine holds every layer and each token reads weights once while cache grows "
    "with context so bandwidth bounds decode speed but arithmetic bounds prefill when prompts are long "
    "a block stores sixteen tokens and blocks move between device host disk and remote tiers under "
    "pressure the scheduler batches requests to share each pass over the weights river mountain quiet "
    "garden letter window market station winter summer yellow silver paper stone bridge harbor signal "
    "number question answer report history future morning evening doctor teacher student engine planet "
    "forest ocean island village city country language music picture story reason method result value "
    "simple careful rapid gentle bright narrow heavy light early late open closed ready final first "
    "second third many few some every other same different small large long short high low near far"
).split()


class TokenSource:
    """Fresh seeded text as exact-length token id lists."""

    def __init__(self, tokenizer: TextTokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def take(self, n: int) -> list[int]:
        if n <= 0:
            return []
        ids: list[int] = []
        while len(ids) < n:
            words = [self.rng.choice(_WORDS) for _ in range(n - len(ids) + 8)]
            text = " " + " ".join(words) + "."
            ids.extend(self.tokenizer.encode(text, add_special_tokens=False))
        return ids[:n]

    def between(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


# ---- generators (knobs are keyword arguments; defaults are the documented shape) ----------------

def short_chat(src: TokenSource, n: int = 16, sys: int = 32, lo: int = 16, hi: int = 64) -> tuple[str, list[BenchRequest]]:
    system = src.take(sys)
    reqs = [BenchRequest(system + src.take(src.between(lo, hi)), src.between(lo, hi), tag=f"c{i}") for i in range(n)]
    return f"{n} chats: {sys}-token shared system prompt + {lo}-{hi} token turn, {lo}-{hi} token replies", reqs


def fixed(src: TokenSource, n: int = 16, isl: int = 512, osl: int = 128, prefix: int = 0) -> tuple[str, list[BenchRequest]]:
    if prefix > isl:
        raise InvalidParameterError(f"fixed: prefix {prefix} > isl {isl}", "keep the shared prefix within the input")
    shared = src.take(prefix)
    reqs = [BenchRequest(shared + src.take(isl - prefix), osl, tag=f"f{i}") for i in range(n)]
    share = f", first {prefix} shared" if prefix else ""
    return f"{n} requests x {isl} in / {osl} out tokens{share}", reqs


def long_doc_qa(src: TokenSource, docs: int = 4, questions: int = 4, doc: int = 1024, q: int = 32,
                osl: int = 32) -> tuple[str, list[BenchRequest]]:
    documents = [src.take(doc) for _ in range(docs)]
    reqs = [BenchRequest(documents[d] + src.take(q), osl, tag=f"d{d}q{k}")
            for k in range(questions) for d in range(docs)]
    return (f"{docs} documents x {questions} questions: {doc}-token document + {q}-token question, "
            f"{osl} out, question-major order"), reqs


def multi_turn(src: TokenSource, users: int = 8, rounds: int = 4, sys: int = 256, user: int = 32,
               osl: int = 32) -> tuple[str, list[BenchRequest]]:
    system = src.take(sys)
    history = [list(system) for _ in range(users)]
    reqs = []
    for r in range(rounds):
        for u in range(users):
            history[u] = history[u] + src.take(user)
            reqs.append(BenchRequest(list(history[u]), osl, tag=f"u{u}r{r}"))
            history[u] = history[u] + src.take(osl)  # the synthetic assistant reply the next round sees
    longest = sys + rounds * user + (rounds - 1) * osl
    return (f"{users} users x {rounds} rounds: {sys}-token shared system prompt, {user}-token turns, "
            f"{osl}-token replies, history up to {longest} tokens, round-robin"), reqs


def batch_gen(src: TokenSource, n: int = 32, isl: int = 64, osl: int = 256) -> tuple[str, list[BenchRequest]]:
    return (f"{n} prompts x {isl} in / {osl} out tokens (synthetic-data job)",
            [BenchRequest(src.take(isl), osl, tag=f"b{i}") for i in range(n)])


@dataclass(frozen=True)
class WorkloadKind:
    name: str
    build: Callable[..., tuple[str, list[BenchRequest]]]
    summary: str

    @property
    def knobs(self) -> dict[str, object]:
        params = list(inspect.signature(self.build).parameters.values())[1:]
        return {p.name: p.default for p in params}


def _trace_builder(src: TokenSource, **knobs) -> tuple[str, list[BenchRequest]]:
    shape, items = build_trace(src, **knobs)
    return shape, [BenchRequest(t.prompt_ids, t.output_len, arrival_s=t.arrival_s, tag=f"t{i}")
                   for i, t in enumerate(items)]


WORKLOADS: dict[str, WorkloadKind] = {k.name: k for k in (
    WorkloadKind("short-chat", short_chat, "short chats with a shared system prompt"),
    WorkloadKind("fixed", fixed, "fixed input/output lengths, optional shared prefix"),
    WorkloadKind("long-doc-qa", long_doc_qa, "documents x questions; reuse across far-apart requests"),
    WorkloadKind("multi-turn", multi_turn, "users x rounds of chat with growing history"),
    WorkloadKind("batch-gen", batch_gen, "many prompts, long outputs"),
    WorkloadKind("trace", _trace_builder, "Mooncake-style JSONL trace replay (trace:path=FILE)"),
)}

_TRACE_KNOBS = {"path": "", "block": 512, "limit": 0, "time_scale": 1.0, "replay": 1}


def knobs_of(kind: WorkloadKind) -> dict[str, object]:
    return dict(_TRACE_KNOBS) if kind.name == "trace" else kind.knobs


def parse_spec(spec: str) -> tuple[WorkloadKind, dict[str, object]]:
    """'multi-turn:users=4,rounds=3' -> (kind, {'users': 4, 'rounds': 3}); InvalidParameterError on bad input."""
    name, _, rest = spec.strip().partition(":")
    kind = WORKLOADS.get(name)
    if kind is None:
        raise InvalidParameterError(f"unknown workload {name!r}", f"use one of {', '.join(WORKLOADS)}")
    defaults = knobs_of(kind)
    knobs: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in defaults:
            raise InvalidParameterError(f"workload {name}: bad knob {item!r}",
                                        f"knobs are {', '.join(f'{k}={v}' for k, v in defaults.items())}")
        default = defaults[key]
        try:
            knobs[key] = type(default)(value.strip()) if not isinstance(default, str) else value.strip()
        except ValueError:
            raise InvalidParameterError(f"workload {name}: {key}={value!r} is not a {type(default).__name__}",
                                        f"e.g. {key}={default}") from None
        if isinstance(knobs[key], int | float) and knobs[key] < 0:
            raise InvalidParameterError(f"workload {name}: {key}={value} is negative", "use a value >= 0")
    return kind, knobs


def build_workload(spec: str, tokenizer: TextTokenizer, seed: int) -> Workload:
    """The workload `spec` names, generated from `seed` (same seed, same token ids)."""
    kind, knobs = parse_spec(spec)
    src = TokenSource(tokenizer, seed)
    shape, reqs = kind.build(src, **knobs)
    if not reqs:
        raise InvalidParameterError(f"workload {spec!r} has no requests", "raise its size knobs")
    for r in reqs:
        if not r.prompt_ids or r.max_tokens < 1:
            raise InvalidParameterError(f"workload {spec!r} makes an empty prompt or zero output tokens",
                                        "use input and output lengths of at least 1")
    resolved = {**knobs_of(kind), **knobs}
    label = f"{kind.name}:" + ",".join(f"{k}={v}" for k, v in resolved.items())
    return Workload(kind.name, label, shape, reqs)
