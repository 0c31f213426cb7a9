"""The scheduler.

Algorithm. There is no prefill phase or decode phase: every request carries num_computed_tokens, and
each step gives each scheduled request some new tokens to compute so that it catches up with
num_tokens (prompt + output). A step has a token budget (max_num_batched_tokens). Running requests go
first, decodes (one token each) before unfinished prefills, so generation never stalls behind a long
prompt; a prefill that does not fit the remaining budget is chunked (chunked prefill), and continues
next step. When the KV pool has no block for a running request, the scheduler preempts by recompute:
it frees the blocks of the lowest-priority running request (the most recently arrived in FCFS mode;
the largest (priority, arrival) in priority mode), puts it back at the front of the waiting queue, and
retries; freed blocks keep their prefix hashes, so the recompute is mostly prefix-cache hits. Then
waiting requests are admitted in order (FCFS, or by (priority, arrival)) while the budget, the
max_num_seqs cap and the pool allow: each first reuses its longest cached prefix, then allocates for
the rest. Admission stops at the first request that does not fit, so later arrivals never overtake.
With chunked prefill off a request waits for a step with room for all of its tokens, unless they
exceed the whole step budget: then it catches up in budget-sized chunks anyway, since it could never
be admitted otherwise and, first in line, would block every request behind it. That happens to a
preempted request, whose recompute is its prompt plus the output so far (the engine rejects new
prompts over the budget when chunking is off).
Blocks are registered in the prefix cache as they are allocated (so requests admitted in the same step
share them); after the forward pass `update_after_step` advances each request's computed tokens and
commits those registrations, while `undo_step` (the forward pass raised) drops them and restarts the
step's requests, so KV that was never written is never reused.

KV tiers (when the KV manager has them). A waiting request whose prefix continues below the device pool
is admitted with its device hits plus fresh blocks that a loader thread fills from host, disk or Redis
(only when the cost model says loading beats recomputing). A load within the step's byte budget is waited
for (bounded by the load timeout) and the request runs this very step; a larger one leaves the request
LOADING while the other requests keep decoding, and it joins the running requests at the first step after
its load finished. A load that times out or finds a corrupt entry keeps what loaded and recomputes the rest.
Preemption rule: the victim is chosen as above; before its blocks are freed, its full cached blocks are
offloaded to host memory and pinned there until it resumes (mode `offload`, or `auto` when the cost model
says storing and reloading them is cheaper than recomputing its context; never in mode `recompute`); its
partial last block (under block_size tokens) is always recomputed. When it is admitted again its prefix
comes back as device hits (blocks not yet reused) or host hits, and only the rest is recomputed.

Liveness: every admitted sequence fits the pool on its own (the engine caps the context at what the
pool holds), every step that schedules anything computes at least one token, and a preempted request
is admitted again as soon as it is first in line and its first chunk fits; a property test
(tests/scheduler/test_liveness.py) runs random pools, budgets, chunking modes and request mixes to the end.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tierlm.config import SchedulerConfig
from tierlm.core.request import Request, RequestStatus
from tierlm.kvcache import KVCacheManager


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    block_table: list[int]

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.request.num_computed_tokens == self.request.num_tokens - 1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.loading: list[Request] = []  # admitted, waiting for a lower-tier load
        self.num_preemptions = 0
        self.num_offloads = 0  # preemptions whose blocks were offloaded to host memory
        self.admitting = True  # False: waiting requests stay waiting (the engine drains to switch KV format)

    # ---- queue verbs ---------------------------------------------------------------------------
    def _key(self, r: Request) -> tuple:
        return (r.priority, r.arrival_time) if self.config.policy == "priority" else (r.arrival_time,)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        keys = [self._key(r) for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, self._key(request)), request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and release its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.loading:
            self.loading.remove(request)
        self.kv.free(request)
        self.kv.release_offload(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        load_budget = self.kv.tiers.config.load_step_budget_bytes if self.kv.tiers is not None else 0
        scheduled: dict[int, ScheduledRequest] = {}

        # 0. Requests whose lower-tier load finished (or timed out) join the running requests.
        for req in [r for r in self.loading if self.kv.load_ready(r)]:
            self._finish_load(req)

        # 1. Running requests: decodes first, then unfinished prefills.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for req in order:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n > 1 and self.kv.spill is not None:
                n = max(1, min(n, self.kv.room(req)))  # a prefill chunk that fits, spilling cold blocks
            while True:
                table = self.kv.allocate_slots(req, n)
                if table is not None:
                    break
                victim = max((r for r in self.running if id(r) not in scheduled), key=self._key)
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled[id(req)] = ScheduledRequest(req, n, table)
                budget -= n

        # 2. Waiting requests, in queue order, while they fit.
        while (self.admitting and self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.config.max_num_seqs
               and not out.preempted):
            req = self.waiting[0]
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            lower = self.kv.lower_hit(req)
            n = req.num_tokens - num_hit - (len(lower) * self.kv.block_size if lower else 0)
            if n > budget and not self.config.enable_chunked_prefill and n <= self.config.max_num_batched_tokens:
                break  # it fits a whole step: wait for one with room for all of it
            if lower is not None:
                job = self.kv.start_load(req, hit_blocks, lower)
                if job is None:
                    break
                self.waiting.pop(0)
                req.status = RequestStatus.LOADING
                self.loading.append(req)
                if job.nbytes > load_budget:
                    continue  # loads while others run; joins at the first step after it finished
                load_budget -= job.nbytes
                self.kv.tiers.stats.sync_loads += 1
                job.wait(self.kv.tiers.config.load_timeout_s)
                self._finish_load(req)
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                table = self.kv.allocate_slots(req, n)
                if table is None:
                    break  # running now: the next step allocates for it (preempting if it must)
                scheduled[id(req)] = ScheduledRequest(req, n, table)
                budget -= n
                continue
            n = min(n, budget)
            if n > 1 and self.kv.spill is not None:
                n = max(1, min(n, self.kv.room(req, hit_blocks)))
            table = self.kv.allocate_slots(req, n, hit_blocks)
            if table is None:
                break
            self.waiting.pop(0)
            self.kv.release_offload(req)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[id(req)] = ScheduledRequest(req, n, table)
            budget -= n

        if self.kv.spill is not None:
            # An allocation may have spilled blocks of a request scheduled before it, and handed the freed
            # device blocks to another: every table is read again, so each names where its KV is now.
            for s in scheduled.values():
                s.block_table = self.kv.get_block_table(s.request.request_id)
        if not scheduled and self.loading:
            self.kv.wait_for_loads(0.05)  # nothing else to run: wait for a load instead of spinning
        out.scheduled = sorted(scheduled.values(), key=lambda s: not s.is_decode)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        tiers = self.kv.tiers
        if tiers is not None and tiers.config.preemption_mode != "recompute":
            if tiers.config.preemption_mode == "offload" or self.kv.offload_cheaper(req):
                self.num_offloads += self.kv.offload(req)
        self._requeue(req)

    def _finish_load(self, req: Request) -> None:
        """A LOADING request's load is settled: it runs from what loaded (the rest is recomputed)."""
        self.loading.remove(req)
        req.num_computed_tokens = self.kv.finish_load(req)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = req.num_computed_tokens
        self.kv.release_offload(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _requeue(self, req: Request) -> None:
        """Take a running request back to the waiting queue with its blocks freed, to recompute from zero."""
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        self.add(req)
        req.status = RequestStatus.PREEMPTED

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counters once the step's forward pass has written its KV, and make the
        step's prefix-cache registrations final."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        self.kv.commit_step()

    def undo_step(self, out: SchedulerOutput) -> None:
        """The step's forward pass (or sampling) raised: drop the prefix-cache entries it registered (their
        KV was never written) and restart its requests from zero computed tokens, as a preemption does
        (their blocks are freed; a request that hit another's unwritten block recomputes it too). The
        engine's callers usually abort them next; a caller that steps again gets correct recomputes."""
        self.kv.rollback_step()
        for s in out.scheduled:
            if s.request.status is RequestStatus.RUNNING and s.request in self.running:
                self._requeue(s.request)
