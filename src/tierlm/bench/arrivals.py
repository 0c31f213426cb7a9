"""When requests are sent: closed loop at a fixed concurrency, or open loop at a rate.

Closed loop (`concurrency=C`): C requests in flight; a new one is sent the moment one finishes.
Sweeping C gives throughput against concurrency.

Open loop (`rate=R` req/s): arrival gaps are drawn from a gamma distribution with mean 1/R and
shape `burstiness` (1.0 is a Poisson process; below 1 arrivals bunch up, above 1 they even out),
seeded, as vLLM's benchmark does. Latency counts from the scheduled arrival, so queueing shows.
An optional `concurrency` caps the requests in flight in open loop too. A timed workload (trace
replay) brings its own arrival offsets.

Dependent requests (a multi-turn round that continues an earlier request's reply) arrive when that
request has finished: at max(their planned arrival, the parent's finish). `ArrivalQueue` applies all of
this for both drivers: what may be sent now, in what order, and with what `sent` time.
"""
from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
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


class ArrivalQueue:
    """The requests of one run that may be sent, as the arrival plan and the dependencies allow.

    `parents[i]`: the index of the request whose reply request i continues (an earlier one), or None.
    A request is queued from the start if independent, else once its parent finished (`finished`).
    Closed loop: queued requests go in workload order as slots free up; sent = when it goes.
    Open loop / timed: in arrival order once their arrival (for a dependent one: max(planned arrival,
    the parent's finish)) has passed; sent = that arrival, so queueing counts in the latency.
    Times are absolute `time.monotonic()` values; `start(t0)` fixes the run start the offsets count from.
    """

    def __init__(self, plan: ArrivalPlan, request_offsets: Sequence[float | None], parents: Sequence[int | None]):
        if len(request_offsets) != len(parents):
            raise ValueError("one arrival offset and one parent per request")
        self.offsets = arrival_times(plan, list(request_offsets))
        self.cap = plan.concurrency
        self.children: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            if p is not None:
                if not 0 <= p < i:
                    raise ValueError(f"request {i} continues request {p}, which is not an earlier request")
                self.children.setdefault(p, []).append(i)
        self.parents = list(parents)
        self.unsent = len(parents)  # neither sent nor dropped yet
        self.t0 = 0.0
        self._heap: list[tuple[float, int]] = []

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._heap = [(self._planned(i), i) for i, p in enumerate(self.parents) if p is None]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        """True while some request is still to be sent."""
        return self.unsent > 0

    def _planned(self, i: int) -> float:
        return self.t0 + self.offsets[i] if self.offsets is not None else -math.inf  # closed loop: by index

    def _full(self, inflight: int) -> bool:
        return self.cap is not None and inflight >= self.cap

    def pop(self, now: float, inflight: int) -> tuple[int, float] | None:
        """(index, sent time) of a request to send now, or None (none due yet, or the cap is reached)."""
        if not self._heap or self._full(inflight) or self._heap[0][0] > now:
            return None
        due, i = heapq.heappop(self._heap)
        self.unsent -= 1
        return i, (due if self.offsets is not None else now)

    def next_due(self) -> float | None:
        """When the earliest queued request arrives (None: none queued; a parent must finish first)."""
        return self._heap[0][0] if self._heap else None

    def wait_s(self, now: float, inflight: int) -> float | None:
        """Seconds until a request could go without any in flight finishing; None: only a finish can help."""
        due = self.next_due()
        if due is None or self._full(inflight):
            return None
        return max(0.0, due - now)

    def finished(self, i: int, done: float, ok: bool = True) -> list[int]:
        """Request i ended at `done`: its dependents are queued. If it failed, their prompts cannot be
        built: they (and theirs) are dropped and returned, for the driver to record as failed."""
        kids = self.children.get(i, [])
        if ok:
            for c in kids:
                due = max(self._planned(c), done) if self.offsets is not None else -math.inf
                heapq.heappush(self._heap, (due, c))
            return []
        dropped, todo = [], list(kids)
        while todo:
            c = todo.pop()
            dropped.append(c)
            todo.extend(self.children.get(c, []))
        self.unsent -= len(dropped)
        return sorted(dropped)
