"""When requests are sent: closed loop at a fixed concurrency, or open loop at a rate.

Closed loop (`concurrency=C`): C requests in flight; a new one is sent the moment one finishes.
Sweeping C gives throughput against concurrency.

Open loop (`rate=R` req/s): arrival gaps are drawn from a gamma distribution with mean 1/R and
shape `burstiness` (1.0 is a Poisson process; below 1 arrivals bunch up, above 1 they even out),
seeded, as vLLM's benchmark does. Latency counts from the scheduled arrival, so queueing shows.
An optional `concurrency` caps the requests in flight in open loop too. A timed workload (trace
replay) brings its own arrival offsets.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tierlm.core.errors import InvalidParameterError


@dataclass(frozen=True)
class ArrivalPlan:
    concurrency: int | None = 1  # cap on requests in flight (closed loop: the loop size)
    rate: float | None = None  # open loop: mean requests per second
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidParameterError(f"concurrency {self.concurrency} < 1", "use a concurrency of at least 1")
        if self.rate is not None and self.rate <= 0:
            raise InvalidParameterError(f"request rate {self.rate} <= 0", "give a positive --rate in requests/s")
        if self.burstiness <= 0:
            raise InvalidParameterError(f"burstiness {self.burstiness} <= 0", "use e.g. 1.0 (Poisson) or 0.5 (bursty)")
        if self.rate is None and self.concurrency is None:
            raise InvalidParameterError("closed loop without a concurrency", "give --concurrency or --rate")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def label(self) -> str:
        if self.open_loop:
            cap = f", max {self.concurrency} in flight" if self.concurrency else ""
            return f"open loop {self.rate:g} req/s, burstiness {self.burstiness:g}{cap}"
        return f"closed loop, concurrency {self.concurrency}"

    def offsets(self, n: int) -> list[float]:
        """Seconds from the run start at which each of n requests arrives (open loop only)."""
        if not self.open_loop:
            raise ValueError("a closed-loop plan has no arrival offsets")
        rng = random.Random(self.seed)
        shape = self.burstiness
        scale = 1.0 / (self.rate * shape)
        t, out = 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.gammavariate(shape, scale)
        return out


def arrival_times(plan: ArrivalPlan, request_offsets: list[float | None]) -> list[float] | None:
    """Per-request offsets: a timed workload's own, else the plan's (open loop), else None (closed loop)."""
    if request_offsets and all(o is not None for o in request_offsets):
        return [float(o) for o in request_offsets]
    if plan.open_loop:
        return plan.offsets(len(request_offsets))
    return None
