"""Structured outputs: JSON schema, JSON object, regex, choice and Lark constraints as per-token masks.

Grammar library: llguidance (Microsoft; Rust, CPU, no dependencies). On the default model's tokenizer
(scripts/guided_compare.py) it compiled a 5-field JSON schema in 1.9 ms and computed a mask in ~260 us per token,
accepted a valid instance token by token and rejected an invalid one. xgrammar was faster per mask (~110 us) but
slower to compile (18.5 ms) and pulls transformers and triton; outlines-core rejected a valid instance on this
byte-level BPE vocabulary. llguidance's masks are exact for any tokenization of the text (no canonical-token
assumption), it keeps per-request state small (a matcher), and it drops the GIL while computing a mask.

Flow, per engine:
  add_request -> `StructuredOutputs.guide(params)`: compile (cached by the constraint's text) and make a matcher
  step         -> `begin(reqs)` submits the mask of every guided request to one worker thread before the forward
                  pass, `masks(reqs)` collects them after it (the matcher state only changes on `accept`, which
                  runs after sampling), the sampler sets every disallowed logit to -inf
  after sample -> `Guide.accept(token)`; a guide whose grammar is complete finishes its request (stop)

JSON is generated compactly (", " and ": " separators, no free whitespace): a small model given free whitespace
can emit newlines until max_tokens, and compact JSON is what models saw most.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tierlm.core.errors import InvalidParameterError
from tierlm.core.sampling_params import STRUCTURED_PARAM, StructuredOutputsParams

log = logging.getLogger(__name__)

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE = 256  # compiled grammars kept (by the constraint's text)


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for a constraint; InvalidParameterError when the library refuses it."""
    import llguidance

    kind = params.kind
    try:
        if kind == "json":
            schema = params.json
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema is an object, not a {type(schema).__name__}")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=dict(_JSON_OPTIONS))
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=dict(_JSON_OPTIONS))
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":  # Lark string literals: JSON strings are valid ones
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _rejected(kind, str(e)) from None


def check_constraint(params: StructuredOutputsParams) -> None:
    """InvalidParameterError unless llguidance compiles the constraint (without a tokenizer: no model needed)."""
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar_text(params))
    if err:
        raise _rejected(params.kind, err)


def _rejected(kind: str, why: str) -> InvalidParameterError:
    what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice list",
            "grammar": "Lark grammar"}[kind]
    fix = {"json": "use the JSON Schema keywords llguidance supports (draft 2020-12: type, properties, required, "
                   "items, enum, const, pattern, anyOf, $ref, min/max bounds...)",
           "regex": "use Rust regex syntax (no look-around or back-references)",
           "grammar": "write the grammar in llguidance's Lark dialect with a `start` rule"}.get(kind, "fix it")
    text = " ".join(line.strip() for line in why.strip().splitlines() if line.strip()) or "rejected"
    return InvalidParameterError(f"the {what} cannot be compiled: {text[:400]}", fix, param=STRUCTURED_PARAM[kind])


class Guide:
    """One sequence's matcher: the tokens it allows next, and the tokens it has taken."""

    __slots__ = ("matcher", "kind")

    def __init__(self, matcher, kind: str):
        self.matcher = matcher
        self.kind = kind

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask into `row` (int32 [W], contiguous, on the CPU)."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False when the grammar did not allow it (the matcher is then in error)."""
        return bool(self.matcher.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing may follow (end of sequence included, once taken)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class StructuredOutputs:
    """Compiles constraints for one tokenizer and computes the masks of a step's guided rows."""

    def __init__(self, tokenizer, vocab_size: int, overlap: bool = True):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # logits width (may exceed the tokenizer's vocabulary)
        self.words = (vocab_size + 31) // 32
        self.overlap = overlap
        self._ll_tok = None
        self._lock = threading.Lock()
        self._protos: OrderedDict[str, object] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[list, Future] | None = None
        self.counters = {"compiled": 0, "cache_hits": 0, "masks": 0, "mask_seconds": 0.0, "wait_seconds": 0.0}

    # ---- compiling -----------------------------------------------------------------------------
    def _ll_tokenizer(self):
        if self._ll_tok is None:
            import llguidance

            eos = [int(t) for t in self.tokenizer.eos_token_ids] or None
            self._ll_tok = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=eos)
        return self._ll_tok

    def guide(self, params: StructuredOutputsParams) -> Guide:
        """A fresh matcher for `params`; the compiled grammar is shared by equal constraints."""
        import llguidance

        key = params.key
        with self._lock:
            proto = self._protos.get(key)
            if proto is not None:
                self._protos.move_to_end(key)
                self.counters["cache_hits"] += 1
        if proto is None:
            grammar = grammar_text(params)
            tok = self._ll_tokenizer()
            err = llguidance.LLMatcher.validate_grammar(grammar, tok)
            if err:
                raise _rejected(params.kind, err)
            proto = llguidance.LLMatcher(tok, grammar, log_level=0)
            if proto.is_error():
                raise _rejected(params.kind, proto.get_error())
            with self._lock:
                self._protos[key] = proto
                self.counters["compiled"] += 1
                while len(self._protos) > _CACHE:
                    self._protos.popitem(last=False)
        return Guide(proto.deep_copy(), params.kind)

    # ---- masks ---------------------------------------------------------------------------------
    def _compute(self, guides: list[Guide]) -> torch.Tensor:
        import time

        t0 = time.perf_counter()
        bits = torch.empty((len(guides), self.words), dtype=torch.int32)  # bits: [G, W]
        for i, g in enumerate(guides):
            g.fill(bits[i])
        self.counters["masks"] += len(guides)
        self.counters["mask_seconds"] += time.perf_counter() - t0
        return bits

    def begin(self, requests) -> None:
        """Start computing the masks of these requests' guides (those with one) while the caller runs the
        forward pass; `masks` collects them. Without overlap, nothing starts here."""
        self.cancel()
        guides = [r.guide for r in requests if r.guide is not None]
        if not guides or not self.overlap:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tierlm-structured")
        self._pending = (guides, self._pool.submit(self._compute, guides))

    def masks(self, requests) -> tuple[list[int], torch.Tensor] | None:
        """(rows, allowed [R, V] bool) for the rows of `requests` that carry a guide, or None when none do."""
        import time

        rows = [i for i, r in enumerate(requests) if r.guide is not None]
        pending, self._pending = self._pending, None
        if not rows:
            if pending is not None:
                pending[1].result()
            return None
        guides = [requests[i].guide for i in rows]
        bits = None
        if pending is not None:
            t0 = time.perf_counter()
            done = pending[1].result()
            self.counters["wait_seconds"] += time.perf_counter() - t0
            index = {id(g): j for j, g in enumerate(pending[0])}
            if all(id(g) in index for g in guides):
                bits = done[[index[id(g)] for g in guides]]
        if bits is None:
            bits = self._compute(guides)
        return rows, unpack(bits, self.vocab_size)

    def cancel(self) -> None:
        """Wait out a started mask computation (a step that failed after `begin`)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].result()

    def close(self) -> None:
        self.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmask [R, W] (bit j of word w allows token 32 w + j) -> bool [R, vocab]."""
    return ((bits.unsqueeze(-1) >> _SHIFTS) & 1).view(bits.shape[0], -1)[:, :vocab].bool()
