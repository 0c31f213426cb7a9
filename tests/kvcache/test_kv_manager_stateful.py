"""Random allocate / chunked prefill / decode / free / prefix-hit sequences against KVCacheManager.

Besides `check_integrity()` after every operation, the machine keeps a shadow of the device memory
(which token's KV each slot of each block holds, written as the model would write it) and checks:
  * sum of ref counts == sum of live block-table lengths, and each table covers its tokens exactly;
  * every prefix hit hands out blocks whose shadow KV is exactly the request's tokens;
  * an allocation that returns None changes nothing.
"""
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tierlm.core.request import Request
from tierlm.core.sampling_params import SamplingParams
from tierlm.kvcache.manager import KVCacheManager

BS = 4
NUM_BLOCKS = 12
# Prompts start with a prefix of one of these, so hits (and partial hits) are frequent.
BASES = ([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], [1, 2, 3, 1, 0, 0, 0, 0, 2, 2, 2, 2], [3] * 12)


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.mgr = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=True, hash_seed=11, extra_keys=("m", "bf16"))
        self.live: dict[str, Request] = {}
        self.kv: dict[int, list[int | None]] = {i: [None] * BS for i in range(NUM_BLOCKS)}
        self.count = 0

    # ---- helpers ---------------------------------------------------------------------------

    def snapshot(self):
        pool = self.mgr.pool
        return (
            [b.block_id for b in pool.free_queue],
            [(b.ref_cnt, b.block_hash) for b in pool.blocks],
            {rid: self.mgr.get_block_table(rid) for rid in self.live},
        )

    def write(self, req: Request, table: list[int], lo: int, hi: int) -> None:
        """The forward pass: store the KV of tokens [lo, hi) in their slots."""
        for pos in range(lo, hi):
            self.kv[table[pos // BS]][pos % BS] = req.token_id_at(pos)

    def allocate(self, req: Request, num_new: int, hits=()) -> list[int] | None:
        before = self.snapshot()
        table = self.mgr.allocate_slots(req, num_new, hits)
        if table is None:
            event("allocation refused")
            assert self.snapshot() == before, "a failed allocation changed state"
        else:
            assert table == self.mgr.get_block_table(req.request_id)
        return table

    # ---- rules -----------------------------------------------------------------------------

    @rule(
        base=st.sampled_from(BASES),
        keep=st.integers(0, 12),
        tail=st.lists(st.integers(0, 3), max_size=8),
        chunk=st.integers(1, 20),
    )
    def add_request(self, base, keep, tail, chunk):
        prompt = base[:keep] + tail or [0]
        self.count += 1
        req = Request(f"r{self.count}", prompt, SamplingParams())
        hits, num_hit = self.mgr.get_computed_blocks(req)
        assert num_hit == len(hits) * BS < len(prompt)
        event("prefix hit" if hits else "prefix miss")
        for i, block_id in enumerate(hits):
            assert self.kv[block_id] == prompt[i * BS : (i + 1) * BS], "hit block holds other tokens' KV"
        num_new = min(chunk, len(prompt) - num_hit)
        table = self.allocate(req, num_new, hits)
        if table is None:
            self.mgr.free(req)  # drops the hashes kept by get_computed_blocks
            return
        self.write(req, table, num_hit, num_hit + num_new)
        req.num_computed_tokens = num_hit + num_new
        self.mgr.commit_step()
        self.live[req.request_id] = req

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 20), token=st.integers(0, 3))
    def step(self, data, chunk, token):
        """A prefill chunk, or a decode step once the request has computed all its tokens."""
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(token)
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        table = self.allocate(req, num_new)
        if table is None:  # the scheduler would preempt it
            self.mgr.free(req)
            del self.live[req.request_id]
            return
        self.write(req, table, req.num_computed_tokens, req.num_computed_tokens + num_new)
        req.num_computed_tokens += num_new
        self.mgr.commit_step()

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 20), token=st.integers(0, 3))
    def failed_step(self, data, chunk, token):
        """A step whose forward pass raises: slots allocated (and registered), nothing written; the engine
        rolls the step's registrations back and the request is restarted (its blocks freed)."""
        req = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(token)
        lo = req.num_computed_tokens
        table = self.allocate(req, min(chunk, req.num_tokens - lo))
        if table is not None:  # the slots of this step hold garbage now
            for pos in range(lo, min(req.num_tokens, len(table) * BS)):
                self.kv[table[pos // BS]][pos % BS] = -1
        self.mgr.rollback_step()
        self.mgr.free(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.mgr.free(self.live.pop(rid))
        assert self.mgr.get_block_table(rid) == []

    @rule()
    def reset_prefix_cache(self):
        self.mgr.reset_prefix_cache()

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def consistent(self):
        self.mgr.check_integrity()
        tables = {rid: self.mgr.get_block_table(rid) for rid in self.live}
        assert sum(b.ref_cnt for b in self.mgr.pool.blocks) == sum(len(t) for t in tables.values())
        for rid, req in self.live.items():
            assert len(tables[rid]) == -(-req.num_computed_tokens // BS), f"{rid} table does not cover its tokens"
        for block in self.mgr.pool.blocks:
            if block.block_hash is not None:
                assert tuple(self.kv[block.block_id]) == block.token_ids, "cached block's KV differs from its tokens"
        assert self.mgr.num_free_blocks == sum(1 for b in self.mgr.pool.blocks if b.ref_cnt == 0)


KVCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_kv_manager_stateful = KVCacheMachine.TestCase
