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
                  second one) so reuse distance spans all the documents. Long contexts:
                  long-doc-qa:docs=4,questions=4,doc=4096,q=64 (4.2K tokens)
    multi-turn    users x rounds of a conversation: round 0 is the shared system prompt (sys tokens)
                  + the user's own earlier history (hist tokens, 0: none) + a user turn (user
                  tokens); round r+1 of a user is sent only once round r's reply has finished, and
                  its prompt is round r's prompt + round r's ACTUAL reply tokens (osl of them) + a
                  new user turn; round-robin order across users, so reuse distance spans them all.
                  Long contexts: multi-turn:users=8,rounds=4,sys=1024,user=256,osl=64 (up to 2.2K
                  tokens) or multi-turn:users=4,rounds=4,hist=4096,user=256,osl=128 (up to 5.9K)
    batch-gen     n short prompts, long outputs (synthetic-data jobs)
    trace         replay of a Mooncake-style JSONL trace (see trace.py)

Dependent requests (multi-turn rounds after the first) carry no prompt of their own: `history_from`
names the request whose conversation they continue and `turn_ids` the new user turn, and a driver
builds the prompt with `resolve_prompt` once that request has finished (so it holds the model's real
reply, as a chat client's next turn does). Their lengths are still known up front, since replies are
exactly max_tokens long: `Workload.prompt_len_bounds` (and max_prompt_len / max_seq_len, which size the
engine and check the context) count them. The seeded parts (system prompt, histories, user turns) are
the same on every run; greedy replies make the rest the same for every correct configuration, so the
greedy-token diff against the reference still compares like with like.
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
    """One request of a workload. Independent (history_from None): `prompt_ids` is the whole prompt.
    Dependent: `prompt_ids` is empty, and the prompt is the prompt of request `history_from` (an earlier
    index in the same request list) + that request's output tokens + `turn_ids` (`resolve_prompt`);
    drivers send it only after that request has finished."""

    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float | None = None  # offset from the run start (trace replay); None: the arrival plan decides
    tag: str = ""
    history_from: int | None = None  # index of the request whose reply this one continues (None: independent)
    turn_ids: list[int] = field(default_factory=list)  # what a dependent request appends after that reply

    @property
    def dependent(self) -> bool:
        return self.history_from is not None


def resolve_prompt(req: BenchRequest, parent_prompt_ids: list[int] | None = None,
                   parent_output_ids: list[int] | None = None) -> list[int]:
    """The prompt to send for `req`: its own prompt_ids if independent, else the parent's (resolved)
    prompt + the parent's actual output tokens + req.turn_ids. The one rule both drivers use."""
    if req.history_from is None:
        return list(req.prompt_ids)
    if parent_prompt_ids is None or parent_output_ids is None:
        raise ValueError(f"request {req.tag or '?'} continues request {req.history_from}: "
                         "its prompt needs that request's prompt and output tokens")
    return [*parent_prompt_ids, *parent_output_ids, *req.turn_ids]


def check_dependencies(requests: list[BenchRequest]) -> None:
    """ValueError unless every dependent request continues an earlier request of the list."""
    for i, r in enumerate(requests):
        if r.history_from is not None and not 0 <= r.history_from < i:
            raise ValueError(f"request {i} ({r.tag}) continues request {r.history_from}, "
                             "which is not an earlier request of the list")


def prompt_len_bounds(requests: list[BenchRequest]) -> list[int]:
    """Each request's prompt length, known before the run: a dependent request's is its parent's + the
    parent's max_tokens (replies are greedy with EOS ignored, so exactly that long in-process) + its turn.
    An upper bound where a server may stop a reply early."""
    check_dependencies(requests)
    out: list[int] = []
    for r in requests:
        if r.history_from is None:
            out.append(len(r.prompt_ids))
        else:
            out.append(out[r.history_from] + requests[r.history_from].max_tokens + len(r.turn_ids))
    return out


@dataclass
class Workload:
    name: str
    spec: str  # the command-line spec that built it, knobs resolved
    shape: str  # one human line: sizes that make the numbers mean something
    requests: list[BenchRequest] = field(default_factory=list)

    @property
    def prompt_len_bounds(self) -> list[int]:
        """Per request, its prompt length (dependent requests included: see `prompt_len_bounds`)."""
        return prompt_len_bounds(self.requests)

    @property
    def max_prompt_len(self) -> int:
        return max(self.prompt_len_bounds, default=0)

    @property
    def max_seq_len(self) -> int:
        """The longest request, prompt + output tokens (what the context and the KV pool must hold)."""
        return max((n + r.max_tokens for n, r in zip(self.prompt_len_bounds, self.requests)), default=0)

    @property
    def timed(self) -> bool:
        return bool(self.requests) and all(r.arrival_s is not None for r in self.requests)

    def known_prefix_ids(self, i: int) -> list[int]:
        """The leading prompt ids of request i that are known before the run: its whole prompt if
        independent, else those of the request its conversation started with."""
        r = self.requests[i]
        while r.history_from is not None:
            r = self.requests[r.history_from]
        return r.prompt_ids

    @property
    def shared_prefix_tokens(self) -> int:
        """Leading tokens every request's prompt shares (a system prompt, a common prefix): measured from
        the token ids, not declared by the generator (a dependent request's prompt starts with its
        conversation's first prompt, so that one stands in for it)."""
        prompts = [r.prompt_ids for r in self.requests if r.history_from is None]
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
               osl: int = 32, hist: int = 0, osl_min: int = 0) -> tuple[str, list[BenchRequest]]:
    """Round 0: system prompt + the user's own history (hist tokens) + a user turn; round r+1: continues
    round r of the same user (history_from), appending its actual reply and a new user turn. Replies are
    `osl` tokens, or drawn from osl_min..osl per reply when osl_min > 0 (users then fall out of step, so
    one user's next round arrives, and loads its history, while others are still decoding)."""
    if osl_min > osl:
        raise InvalidParameterError(f"multi-turn: osl_min {osl_min} > osl {osl}", "keep osl_min <= osl")
    system = src.take(sys)
    reqs: list[BenchRequest] = []
    for r in range(rounds):
        for u in range(users):
            n_out = src.between(osl_min, osl) if osl_min else osl
            if r == 0:
                reqs.append(BenchRequest(system + src.take(hist) + src.take(user), n_out, tag=f"u{u}r0"))
            else:
                reqs.append(BenchRequest([], n_out, tag=f"u{u}r{r}", history_from=(r - 1) * users + u,
                                         turn_ids=src.take(user)))
    longest = sys + hist + rounds * user + (rounds - 1) * osl
    own = f" + {hist}-token history per user" if hist else ""
    replies = f"{osl_min}-{osl}-token" if osl_min else f"{osl}-token"
    return (f"{users} users x {rounds} rounds: {sys}-token shared system prompt{own}, {user}-token turns, "
            f"{replies} replies (the model's own, each round sent when the last one finished), "
            f"history up to {longest} tokens, round-robin"), reqs


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
    WorkloadKind("multi-turn", multi_turn, "users x rounds of chat; each round carries the last real reply"),
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
        if (not r.prompt_ids and r.history_from is None) or r.max_tokens < 1:
            raise InvalidParameterError(f"workload {spec!r} makes an empty prompt or zero output tokens",
                                        "use input and output lengths of at least 1")
    check_dependencies(reqs)
    resolved = {**knobs_of(kind), **knobs}
    label = f"{kind.name}:" + ",".join(f"{k}={v}" for k, v in resolved.items())
    return Workload(kind.name, label, shape, reqs)
