"""A request as the scheduler and KV manager see it: token ids plus progress counters."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tierlm.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    LOADING = "loading"  # admitted; its cached prefix is being loaded from a lower KV tier
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    Token layout (num_computed_tokens counts tokens whose KV is already in the cache):

        | prompt_token_ids ............ | output_token_ids ... |
        |<--- num_computed_tokens --->|<- still to compute ->|
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    priority: int = 0  # lower value = served first when the scheduler runs in priority mode
    cache_salt: str | None = None  # joins the block hashes: only requests with the same salt share a prefix
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit tokens at first schedule; -1 until scheduled
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # of those, where they came from
    num_preemptions: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None
    stop_reason: str | int | None = None
    # Teacher forcing (LLMEngine.score): the output tokens are these instead of sampled ones, and each
    # step's logits row for this request is appended to logits_sink (fp32, on the CPU).
    forced_token_ids: list[int] | None = None
    logits_sink: list | None = None
    # Drift guard (engine/drift_guard.py): chosen for shadow scoring, each sampled-from logits row leaves its
    # top-k log-probabilities here as ([k] values, [k] token ids) on the CPU.
    shadow: list | None = None
    # Structured outputs (engine/structured.py): the matcher that masks this sequence's next tokens.
    guide: object | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished
