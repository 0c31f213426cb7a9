"""Liveness: whatever the pool, step budget, chunking and prefix-caching modes and request mix, every
admitted request finishes, within a bounded number of steps, and the pool is whole afterwards.

The loop below is the engine's, with the model replaced by "write the KV, append a token": requests are
admitted under the engine's rules (a prompt leaves room for one token in the context, which is capped at
what the pool holds; with chunking off a new prompt fits one step), then scheduled until done."""
from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tierlm.config import SchedulerConfig
from tierlm.core.request import Request, RequestStatus
from tierlm.core.sampling_params import SamplingParams
from tierlm.kvcache import KVCacheManager
from tierlm.scheduler import Scheduler


@st.composite
def setups(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    num_blocks = draw(st.integers(1, 24))
    budget = draw(st.integers(1, 64))
    chunked = draw(st.booleans())
    context = num_blocks * block_size  # the engine caps the context at the pool
    base = draw(st.lists(st.integers(0, 5), min_size=1, max_size=40))  # shared prefixes hit the cache
    reqs = []
    for i in range(draw(st.integers(1, 8))):
        keep = draw(st.integers(0, len(base)))
        prompt = (base[:keep] + draw(st.lists(st.integers(0, 5), max_size=12))) or [i]
        if len(prompt) >= context or (not chunked and len(prompt) > budget):
            continue  # the engine rejects it at add_request
        max_tokens = draw(st.integers(1, context - len(prompt)))
        reqs.append((prompt, max_tokens, draw(st.integers(0, 3))))
    return dict(block_size=block_size, num_blocks=num_blocks, budget=budget, chunked=chunked,
                prefix=draw(st.booleans()), max_seqs=draw(st.integers(1, 6)),
                policy=draw(st.sampled_from(["fcfs", "priority"])), reqs=reqs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_every_request_finishes(s):
    kv = KVCacheManager(s["num_blocks"], s["block_size"], s["prefix"])
    sched = Scheduler(SchedulerConfig(max_num_seqs=s["max_seqs"], max_num_batched_tokens=s["budget"],
                                      enable_chunked_prefill=s["chunked"], policy=s["policy"]), kv)
    reqs = [Request(f"r{i}", list(p), SamplingParams(max_tokens=m), priority=prio, arrival_time=float(i))
            for i, (p, m, prio) in enumerate(s["reqs"])]
    for r in reqs:
        sched.add(r)
    total = sum(r.num_prompt_tokens + r.sampling_params.max_tokens for r in reqs)
    steps = 0
    bound = 4 * total * (1 + total) + 10  # generous: a preemption recomputes at most what was computed
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty, (f"stalled: waiting {[(r.request_id, r.num_tokens) for r in sched.waiting]}, "
                                  f"running {[r.request_id for r in sched.running]}, free {kv.num_free_blocks}")
        assert out.num_batched_tokens <= s["budget"]
        sched.update_after_step(out)
        for sr in out.scheduled:
            r = sr.request
            if r.num_computed_tokens == r.num_tokens:  # caught up: the model samples one token
                r.output_token_ids.append(7)
                if len(r.output_token_ids) >= r.sampling_params.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
        kv.check_integrity()
        steps += 1
        assert steps <= bound, "no stall, but no end either"
    event("preempted" if sched.num_preemptions else "no preemption")
    assert all(len(r.output_token_ids) == r.sampling_params.max_tokens for r in reqs)
    assert kv.num_free_blocks == s["num_blocks"]
