"""Scheduler decisions on synthetic requests with a real KV manager (no model needed)."""
from __future__ import annotations

from tierlm.config import SchedulerConfig
from tierlm.core.request import Request, RequestStatus
from tierlm.core.sampling_params import SamplingParams
from tierlm.kvcache import KVCacheManager
from tierlm.scheduler import Scheduler


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, policy="fcfs", chunked=True, prefix=True):
    kv = KVCacheManager(num_blocks, block_size, prefix)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked, policy=policy)
    return Scheduler(cfg, kv), kv


def req(rid, n, t, priority=0, base=0):
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=50), priority=priority, arrival_time=t)


def run_step(s, sample_token=7):
    """Pretend the model ran: advance counters, append a token to requests that caught up."""
    out = s.schedule()
    s.update_after_step(out)
    for sr in out.scheduled:
        r = sr.request
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(sample_token)
    return out


def test_decode_first_and_chunked_prefill():
    s, kv = make(budget=10)
    a = req("a", 6, 0.0)
    s.add(a)
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6)]
    b = req("b", 20, 1.0, base=100)
    s.add(b)
    out = run_step(s)  # a decodes (1), b gets the remaining 9 of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.scheduled[0].is_decode and not out.scheduled[1].is_decode
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 2)]
    assert b.num_computed_tokens == 20 and len(b.output_token_ids) == 1
    kv.check_integrity()


def test_no_chunking_waits_for_a_step_with_room():
    s, _ = make(budget=8, chunked=False)
    s.add(req("a", 3, 0.0))
    run_step(s)  # a: prefill, now decoding
    s.add(req("b", 8, 1.0, base=50))  # fits a whole step, but not the 7 tokens a's decode leaves
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1)]
    assert [r.request_id for r in s.waiting] == ["b"]


def test_no_chunking_still_chunks_what_could_never_fit_one_step():
    """A request with more tokens left than the whole step budget (a preempted request's recompute: prompt
    plus output so far) is chunked anyway; waiting for a step it can never get would block the queue."""
    s, kv = make(budget=8, chunked=False)
    big = req("big", 12, 0.0)
    s.add(big)
    s.add(req("small", 3, 1.0, base=50))
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("big", 8)]
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("big", 4), ("small", 3)]
    assert big.num_computed_tokens == 12 and len(big.output_token_ids) == 1
    kv.check_integrity()


def test_fcfs_admission_stops_at_first_misfit():
    s, _ = make(num_blocks=6, block_size=4, budget=100)
    s.add(req("a", 16, 0.0))
    s.add(req("b", 12, 1.0, base=50))  # needs 3 blocks, only 2 left
    s.add(req("c", 4, 2.0, base=90))  # would fit, but must not overtake b
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_preemption_picks_latest_arrival_and_requeues_front():
    s, kv = make(num_blocks=4, block_size=4, budget=100)
    a, b = req("a", 8, 0.0), req("b", 7, 1.0, base=50)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 2 blocks, b: 2 blocks; a has 9 tokens now, needs a 3rd block
    out = run_step(s)
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and b.num_preemptions == 1
    kv.check_integrity()


def test_priority_policy_orders_waiting_and_victims():
    s, _ = make(policy="priority", budget=100)
    s.add(req("low", 4, 0.0, priority=5))
    s.add(req("high", 4, 1.0, priority=0, base=10))
    s.add(req("mid", 4, 2.0, priority=2, base=20))
    assert [r.request_id for r in s.waiting] == ["high", "mid", "low"]


def test_max_num_seqs_caps_running():
    s, _ = make(max_seqs=2, budget=100)
    for i in range(4):
        s.add(req(f"r{i}", 4, float(i), base=10 * i))
    out = run_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_prefix_hit_skips_computed_tokens():
    s, kv = make(block_size=4, budget=100)
    a = req("a", 13, 0.0)
    s.add(a)
    run_step(s)
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    b = req("b", 13, 1.0)  # same 13 tokens: 3 full blocks cached, the last token recomputed
    s.add(b)
    out = run_step(s)
    assert out.scheduled[0].num_new_tokens == 1
    assert b.num_cached_tokens == 12
    kv.check_integrity()
