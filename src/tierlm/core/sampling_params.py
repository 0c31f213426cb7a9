"""Sampling parameters (vLLM-compatible names). Validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.core.errors import InvalidParameterError


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

    def __post_init__(self) -> None:
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
