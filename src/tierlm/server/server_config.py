"""ServerConfig: the HTTP server's settings (the engine's are EngineConfig). Frozen, validated."""
from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.core.errors import InvalidParameterError

PROMPT_POLICIES = ("reject", "truncate_left", "truncate_middle", "summarize")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "default"  # the id clients send as `model`; the checkpoint's own id is accepted too
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no auth. Never logged.
    max_queue: int = 256  # sequences accepted beyond max_num_seqs before answering 503
    timeout: float | None = 600.0  # seconds per request, queueing included; None: no limit
    prompt_policy: str = "reject"  # server-wide default; a request may pick another
    max_body_bytes: int = 8 << 20
    retry_after: int = 1  # seconds, the Retry-After of a 503
    graceful_timeout: float = 30.0  # seconds to finish in-flight requests on shutdown

    def __post_init__(self) -> None:
        if self.prompt_policy not in PROMPT_POLICIES:
            raise InvalidParameterError(f"unknown prompt policy {self.prompt_policy!r}",
                                        f"use one of {', '.join(PROMPT_POLICIES)}")
        if self.max_queue < 0:
            raise InvalidParameterError(f"max_queue {self.max_queue} < 0", "use 0 or more")
        if self.timeout is not None and self.timeout <= 0:
            raise InvalidParameterError(f"timeout {self.timeout} <= 0", "give a positive number of seconds")
        if self.max_body_bytes < 1024:
            raise InvalidParameterError(f"max_body_bytes {self.max_body_bytes} < 1024", "allow at least 1 KiB")
        if any(not k for k in self.api_keys):
            raise InvalidParameterError("an API key is empty", "give non-empty keys")
