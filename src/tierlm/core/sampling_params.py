"""Sampling parameters (vLLM-compatible names). Validated on construction."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tierlm.core.errors import InvalidParameterError

STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# the `param` an InvalidParameterError about each kind of constraint names (the server renames it to the request
# field the constraint came from: response_format, guided_json, structured_outputs...)
STRUCTURED_PARAM = {"json": "json_schema", "json_object": "response_format", "regex": "regex", "choice": "choice",
                    "grammar": "grammar"}
STRUCTURED_PARAMS = frozenset(STRUCTURED_PARAM.values()) | {"structured_outputs"}


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's name and fields); exactly one is set.

    json: a JSON schema (dict or its text); json_object: any JSON object; regex: a regular expression the whole
    output matches; choice: the output is one of these strings; grammar: a Lark grammar (llguidance's dialect).
    The engine turns it into a per-token mask (engine/structured.py); a constraint the grammar library rejects is
    an InvalidParameterError naming it.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_ = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        fix = "set exactly one of json, json_object, regex, choice, grammar"
        if len(set_) != 1:
            raise InvalidParameterError(f"structured outputs: {'none' if not set_ else ', '.join(set_)} set", fix,
                                        param="structured_outputs")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidParameterError(f"structured outputs: json is a {type(self.json).__name__}",
                                        "give a JSON schema as an object or as its JSON text", param="json_schema")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise InvalidParameterError(f"structured outputs: choice {self.choice!r}",
                                        "give a non-empty list of non-empty strings", param="choice")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidParameterError(f"structured outputs: {name} {v!r}", f"give {name} as a non-empty string",
                                            param=name)
        if self.choice is not None:
            object.__setattr__(self, "choice", list(self.choice))

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal constraints share one compiled grammar."""
        value: Any = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # not JSON: the compiler says so
        return json.dumps([self.kind, value], sort_keys=True)

    @classmethod
    def from_dict(cls, d: "StructuredOutputsParams | dict | None") -> "StructuredOutputsParams | None":
        if d is None or isinstance(d, StructuredOutputsParams):
            return d
        if not isinstance(d, dict):
            raise InvalidParameterError(f"structured outputs: {type(d).__name__}", "give an object such as "
                                        '{"json": SCHEMA} or {"regex": "..."}', param="structured_outputs")
        unknown = sorted(set(d) - set(STRUCTURED_KINDS))
        if unknown:
            raise InvalidParameterError(f"structured outputs: unknown field {unknown[0]!r}",
                                        f"use one of {', '.join(STRUCTURED_KINDS)}", param="structured_outputs")
        return cls(**d)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy. top_k <= 0 disables top-k; top_p == 1 and min_p == 0 disable theirs.
    Penalties follow the OpenAI (presence/frequency, additive over generated tokens) and CTRL
    (repetition, multiplicative over prompt + generated tokens) conventions, as vLLM does.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()

    def _check(self) -> None:
        def bad(param: str, problem: str, fix: str) -> None:
            raise InvalidParameterError(f"invalid {param}: {problem}", fix, param=param)

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"{self.n!r}", "n must be an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"{self.max_tokens!r}", "max_tokens must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", f"{self.min_tokens!r}", "min_tokens must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"{self.min_tokens} > max_tokens {self.max_tokens}", "keep min_tokens <= max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"{self.temperature!r}", "temperature must be in [0, 100]; 0 is greedy")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"{self.top_p!r}", "top_p must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"{self.top_k!r}", "top_k must be an integer; 0 or -1 disables it")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"{self.min_p!r}", "min_p must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", f"{self.repetition_penalty!r}", "repetition_penalty must be in (0, 10]; 1 disables it")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"{self.presence_penalty!r}", "presence_penalty must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"{self.frequency_penalty!r}", "frequency_penalty must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", f"{self.seed!r}", "seed must be a non-negative integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", f"{self.stop!r}", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", f"{self.stop_token_ids!r}", "stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", f"{self.logprobs!r}", "logprobs must be an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
