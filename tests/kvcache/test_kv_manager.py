"""KVCacheManager: exact block tables, prefix hits, eviction order, and all-or-nothing allocation."""
import pytest

from tierlm.core.request import Request
from tierlm.core.sampling_params import SamplingParams
from tierlm.kvcache.hashing import hash_request_blocks
from tierlm.kvcache.manager import KVCacheManager, KVCacheStats

BS = 4
A = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens


def make_request(rid: str, tokens) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def manager(num_blocks: int = 10, prefix: bool = True, **kw) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix, **kw)


def prefill(mgr: KVCacheManager, req: Request) -> list[int]:
    """Schedule the whole prompt in one step, as the scheduler would: probe, allocate, advance."""
    hits, num_hit = mgr.get_computed_blocks(req)
    table = mgr.allocate_slots(req, req.num_tokens - num_hit, hits)
    assert table is not None
    req.num_computed_tokens = req.num_tokens
    mgr.commit_step()  # the forward pass wrote the KV
    mgr.check_integrity()
    return table


def decode(mgr: KVCacheManager, req: Request, token: int) -> list[int] | None:
    req.output_token_ids.append(token)
    table = mgr.allocate_slots(req, 1)
    if table is not None:
        req.num_computed_tokens += 1
        mgr.commit_step()
    mgr.check_integrity()
    return table


def snapshot(mgr: KVCacheManager, *rids: str):
    pool = mgr.pool
    return (
        [b.block_id for b in pool.free_queue],
        [(b.ref_cnt, b.block_hash, b.token_ids) for b in pool.blocks],
        dict(pool.cached),
        {rid: mgr.get_block_table(rid) for rid in rids},
        mgr.stats,
        mgr.num_free_blocks,
    )


def test_tables_grow_by_whole_blocks():
    mgr = manager()
    r = make_request("a", A)
    assert prefill(mgr, r) == [0, 1, 2]
    assert decode(mgr, r, 1) == [0, 1, 2]  # token 11 fits block 2
    assert decode(mgr, r, 2) == [0, 1, 2]  # token 12 fills it
    assert decode(mgr, r, 3) == [0, 1, 2, 3]
    assert mgr.get_block_table("a") == [0, 1, 2, 3]
    assert mgr.num_free_blocks == 6 and mgr.usage == pytest.approx(0.4)


def test_chunked_prefill_extends_the_same_table():
    mgr = manager()
    r = make_request("a", A)
    assert mgr.allocate_slots(r, 3) == [0]
    r.num_computed_tokens = 3
    assert mgr.allocate_slots(r, 6) == [0, 1, 2]
    r.num_computed_tokens = 9
    assert mgr.allocate_slots(r, 1) == [0, 1, 2]
    mgr.check_integrity()


def test_full_blocks_are_cached_under_the_documented_hashes():
    mgr = manager(hash_seed=7, extra_keys=("m", "bf16", "t"))
    r = make_request("a", A)
    prefill(mgr, r)
    expected = hash_request_blocks(A, BS, seed=7, extra_keys=("m", "bf16", "t"))
    assert [mgr.pool.blocks[i].block_hash for i in (0, 1, 2)] == [*expected, None]
    decode(mgr, r, 1)
    decode(mgr, r, 2)  # block 2 now full of known tokens
    assert mgr.pool.blocks[2].block_hash == hash_request_blocks(A + [1, 2], BS, 7, ("m", "bf16", "t"))[2]


def test_prefix_hit_after_free_and_stats():
    mgr = manager()
    prefill(mgr, make_request("a", A))
    mgr.free(make_request("a", A))
    b = make_request("b", A[:8] + [7, 7, 7])
    assert mgr.get_computed_blocks(b) == ([0, 1], 8)
    assert mgr.stats == KVCacheStats(prefix_cache_queries=10, prefix_cache_hits=0, evictions=0)  # not admitted yet
    assert mgr.allocate_slots(b, 3, [0, 1]) == [0, 1, 2]  # a's partial block holds no prefix: reused first
    assert mgr.stats == KVCacheStats(prefix_cache_queries=10 + 11, prefix_cache_hits=0 + 8, evictions=0)
    assert [mgr.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [1, 1, 1, 0]
    mgr.check_integrity()


def test_hit_is_shared_with_a_running_request():
    mgr = manager()
    prefill(mgr, make_request("a", A))
    b = make_request("b", A[:4] + [1, 2])
    assert prefill(mgr, b) == [0, 3]
    assert mgr.pool.blocks[0].ref_cnt == 2


def test_hit_is_capped_to_leave_one_token_to_compute():
    mgr = manager()
    prefill(mgr, make_request("a", A))
    assert mgr.get_computed_blocks(make_request("b", A[:8])) == ([0], 4)
    assert mgr.get_computed_blocks(make_request("c", A[:9])) == ([0, 1], 8)
    assert mgr.get_computed_blocks(make_request("d", A[:4])) == ([], 0)


def test_different_first_block_means_no_hit():
    mgr = manager()
    prefill(mgr, make_request("a", A))
    assert mgr.get_computed_blocks(make_request("b", [0] + A[1:])) == ([], 0)  # chained: later blocks miss too


def test_forged_hash_collision_is_a_miss():
    mgr = manager()
    prefill(mgr, make_request("a", A))
    b = make_request("b", list(range(200, 210)))
    forged = hash_request_blocks(b.all_token_ids, BS)[0]
    mgr.pool.cached[forged] = mgr.pool.blocks[0]  # b's hash now points at a block holding a's tokens
    assert mgr.get_computed_blocks(b) == ([], 0)


def test_eviction_order_is_lru_and_tail_first():
    mgr = manager(num_blocks=8)
    a, b = make_request("a", A), make_request("b", list(range(200, 210)))
    assert prefill(mgr, a) == [0, 1, 2]
    assert prefill(mgr, b) == [3, 4, 5]
    mgr.free(a)  # freed first: least recently used
    mgr.free(b)
    # partial (uncached) tail blocks go to the head, most recently freed first; cached blocks to the
    # tail, each request's freed tail-first
    assert [blk.block_id for blk in mgr.pool.free_queue] == [5, 2, 6, 7, 1, 0, 4, 3]
    c = make_request("c", [9] * 12)
    assert prefill(mgr, c) == [5, 2, 6]  # uncached blocks only
    assert mgr.stats.evictions == 0
    d = make_request("d", [8] * 8)
    assert prefill(mgr, d) == [7, 1]  # the last uncached block, then a's second block before its first
    assert mgr.stats.evictions == 1
    assert mgr.get_computed_blocks(make_request("a2", A)) == ([0], 4)
    assert mgr.get_computed_blocks(make_request("b2", list(range(200, 210)))) == ([3, 4], 8)


def test_allocate_returns_none_and_changes_nothing_when_short():
    mgr = manager(num_blocks=4)
    a = make_request("a", A)
    prefill(mgr, a)  # [0, 1, 2]
    b = make_request("b", [5] * 8)
    before = snapshot(mgr, "a", "b")
    assert mgr.allocate_slots(b, 8) is None
    assert snapshot(mgr, "a", "b") == before
    mgr.check_integrity()
    assert mgr.allocate_slots(b, 4) == [3]


def test_free_hit_blocks_are_not_counted_twice():
    mgr = manager(num_blocks=4)
    a = make_request("a", A[:9])
    prefill(mgr, a)  # [0, 1, 2]
    mgr.free(a)  # queue: 2 3 1 0; blocks 0, 1 cached, 2 a partial block (at the head)
    b = make_request("b", A[:8] + [1] * 9)  # 17 tokens: 5 blocks, 2 of them hits -> 3 new, only 2 spare
    hits, num_hit = mgr.get_computed_blocks(b)
    assert (hits, num_hit) == ([0, 1], 8)
    before = snapshot(mgr, "b")
    assert mgr.allocate_slots(b, 9, hits) is None
    assert snapshot(mgr, "b") == before
    mgr.check_integrity()
    c = make_request("c", A[:8] + [1] * 5)  # 13 tokens: 4 blocks, 2 hits + 2 new = the whole pool
    hits, _ = mgr.get_computed_blocks(c)
    assert mgr.allocate_slots(c, 5, hits) == [0, 1, 2, 3]
    assert mgr.num_free_blocks == 0 and mgr.usage == 1.0
    mgr.check_integrity()


def test_stale_hit_blocks_are_refused():
    mgr = manager(num_blocks=3)
    a = make_request("a", A[:9])
    prefill(mgr, a)
    mgr.free(a)  # queue: 2 1 0
    b = make_request("b", A[:9])
    hits, _ = mgr.get_computed_blocks(b)
    assert hits == [0, 1]
    prefill(mgr, make_request("x", [3] * 12))  # takes 2, then evicts 1 and 0
    with pytest.raises(ValueError, match="not the cached prefix"):
        mgr.allocate_slots(b, 1, hits)
    with pytest.raises(ValueError, match="first allocation"):
        mgr.allocate_slots(make_request("x", [3] * 12), 1, [0])


def test_concurrent_identical_prefills_keep_one_cached_copy():
    mgr = manager()
    a, b = make_request("a", A), make_request("b", A)
    ha, _ = mgr.get_computed_blocks(a)
    hb, _ = mgr.get_computed_blocks(b)  # probed before a allocated: both miss
    assert ha == hb == []
    assert mgr.allocate_slots(a, 10) == [0, 1, 2]
    assert mgr.allocate_slots(b, 10) == [3, 4, 5]
    assert [mgr.pool.blocks[i].block_hash is not None for i in range(6)] == [True, True, False, False, False, False]
    mgr.free(a)
    mgr.free(b)
    assert mgr.get_computed_blocks(make_request("c", A)) == ([0, 1], 8)
    mgr.check_integrity()


def test_a_request_admitted_in_the_same_step_shares_the_prefix():
    """Registration happens at allocation, so the second of two identical prompts (or of n > 1 sequences)
    admitted in one step hits the first's blocks: their KV is written in the step before anyone attends."""
    mgr = manager()
    a, b = make_request("a", A), make_request("b", A)
    assert mgr.allocate_slots(a, 10) == [0, 1, 2]
    hits, n = mgr.get_computed_blocks(b)
    assert (hits, n) == ([0, 1], 8) and mgr.allocate_slots(b, 2, hits) == [0, 1, 3]
    mgr.commit_step()
    mgr.check_integrity()


def test_a_failed_step_drops_what_it_registered():
    """A step allocates (and registers) blocks, then its forward pass raises: rollback_step drops those
    hashes, so a later request with the same prompt cannot hit the never-written blocks, while blocks
    committed by earlier steps stay reusable."""
    mgr = manager()
    old = make_request("old", A[:8])
    prefill(mgr, old)  # committed: blocks 0, 1 hold A[:8]
    mgr.free(old)
    a = make_request("a", A + [7, 7, 7, 7, 7, 7])  # 16 tokens: hits 0, 1; blocks 2, 3 new this step
    hits, n = mgr.get_computed_blocks(a)
    assert mgr.allocate_slots(a, a.num_tokens - n, hits) is not None
    assert mgr.rollback_step() == 2  # blocks for tokens 8..11 and 12..15 were registered by this step
    mgr.free(a)
    assert mgr.get_computed_blocks(make_request("b", A + [7, 7, 7, 7, 7, 7])) == ([0, 1], 8)
    mgr.check_integrity()


def test_prefix_caching_off():
    mgr = manager(prefix=False)
    prefill(mgr, make_request("a", A))
    mgr.free(make_request("a", A))
    assert mgr.get_computed_blocks(make_request("b", A)) == ([], 0)
    assert mgr.pool.cached == {} and mgr.stats == KVCacheStats()
    with pytest.raises(ValueError):
        mgr.allocate_slots(make_request("b", A), 10, [0])


def test_free_unknown_or_twice_is_a_noop():
    mgr = manager()
    a = make_request("a", A)
    mgr.free(a)
    prefill(mgr, a)
    mgr.free(a)
    mgr.free(a)
    assert mgr.num_free_blocks == 10 and mgr.get_block_table("a") == []
    mgr.check_integrity()


def test_reset_prefix_cache():
    mgr = manager()
    a = make_request("a", A)
    prefill(mgr, a)
    assert mgr.reset_prefix_cache() == 2
    assert mgr.get_computed_blocks(make_request("b", A)) == ([], 0)
    decode(mgr, a, 1)
    decode(mgr, a, 2)  # block 2 fills after the reset and is cached again
    assert mgr.get_computed_blocks(make_request("c", A + [1, 2, 0])) == ([], 0)  # its prefix is gone
    mgr.check_integrity()


def test_manager_integrity_catches_a_leaked_reference():
    mgr = manager()
    prefill(mgr, make_request("a", A))
    mgr.pool.touch([mgr.pool.blocks[1]])
    with pytest.raises(AssertionError, match="held by 1 request"):
        mgr.check_integrity()


def test_free_forgets_every_per_request_record():
    mgr = manager()
    probe_only = make_request("p", A)
    mgr.get_computed_blocks(probe_only)  # keeps its hashes for the coming allocate_slots
    mgr.free(probe_only)
    a = make_request("a", A)
    prefill(mgr, a)
    mgr.free(a)
    assert mgr._tables == {} and mgr._hashes == {} and mgr._num_cached == {}


def test_a_request_probed_until_it_fits_counts_its_prefix_query_once():
    mgr = manager(num_blocks=5)
    prefill(mgr, make_request("a", A[:8]))  # blocks 0, 1 (full, cached)
    c = make_request("c", [5] * 4)
    prefill(mgr, c)  # block 2; 2 blocks left free
    b = make_request("b", A[:8] + [1] * 9)  # 17 tokens: 2 hit blocks + 3 new
    for _ in range(3):  # the scheduler retries each step while it does not fit
        hits, _ = mgr.get_computed_blocks(b)
        assert hits == [0, 1] and mgr.allocate_slots(b, 9, hits) is None
    assert mgr.stats.prefix_cache_queries == 8 + 4 and mgr.stats.prefix_cache_hits == 0
    mgr.free(c)
    hits, _ = mgr.get_computed_blocks(b)
    assert mgr.allocate_slots(b, 9, hits) is not None
    assert mgr.stats.prefix_cache_queries == 8 + 4 + 17 and mgr.stats.prefix_cache_hits == 8
    mgr.check_integrity()


def test_a_preempted_request_counts_its_prefix_query_once():
    """Hit rate = cached prompt tokens / prompt tokens per request: a recompute after a preemption (prompt +
    output so far, mostly hits on its own freed blocks) must not count as a second query."""
    mgr = manager()
    r = make_request("r", A)
    prefill(mgr, r)
    assert mgr.stats.prefix_cache_queries == 10 and mgr.stats.prefix_cache_hits == 0
    decode(mgr, r, 1)
    decode(mgr, r, 2)
    mgr.free(r)  # preempted: blocks freed (still cached), computed tokens reset
    r.num_computed_tokens, r.num_preemptions = 0, 1
    hits, n = mgr.get_computed_blocks(r)
    assert n == 8 and mgr.allocate_slots(r, r.num_tokens - n, hits) is not None
    assert mgr.stats.prefix_cache_queries == 10 and mgr.stats.prefix_cache_hits == 0
    mgr.check_integrity()
