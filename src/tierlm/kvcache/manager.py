"""KVCacheManager: the only surface of the KV cache that the scheduler sees.

The manager maps request ids to block tables (lists of block ids, position i of the table holds
tokens [i*B, (i+1)*B), B = block_size) and holds exactly one pool reference per table entry.
A request's life:

    hits, n = get_computed_blocks(req)              # new or preempted request: probe the prefix cache
    table = allocate_slots(req, k, hits)            # first step: take the hits, add room for k tokens
    table = allocate_slots(req, k')                 # later steps (prefill chunks, decodes)
    commit_step() / rollback_step()                 # after each step: its forward pass ran / raised
    free(req)                                       # finished or preempted

With prefix caching on, every block that a step will fill with known tokens is hashed (chained, seeded,
with the manager's extra keys) and registered in the pool when it is allocated, so a request admitted
later in the same step (another sequence of an n > 1 request, an identical prompt) already shares it:
the forward pass writes every new token's K/V in a layer before any token of that layer attends.
Registrations stay pending until the step's forward pass has run: `commit_step` makes them final,
`rollback_step` (the forward pass raised) drops their hashes, so KV that was never written is never
offered again. Later requests with the same prefix reuse registered blocks; freed cached blocks stay
reusable until the pool evicts them (LRU, tail-first).

With lower tiers (a TierController), a device miss continues below the pool:

    hits, n = get_computed_blocks(req)              # device run, then one lookup per lower tier
    lower = lower_hit(req)                          # the blocks found below, if loading beats recompute
    job = start_load(req, hits, lower)              # take the device hits + fresh blocks, load into them
    ... load_ready(req) ...                         # the loader thread verifies and scatters the KV
    num_computed = finish_load(req)                 # register what loaded; the rest is recomputed

An evicted cached block is demoted before anything can overwrite it (write-back), a step's new blocks
are stored at commit with write-through, a preempted sequence's blocks can be offloaded (`offload`),
and pinned prefixes keep one extra reference on their device blocks and a pin in every tier.

With a SpillStore (kvcache/spill.py; sparse decoding), a pool too short for an allocation first spills
blocks of running sequences: full, computed blocks held by that sequence alone, outside the sink and the
recent window its selector always reads, the ones picked least recently first (ties: the earlier
position). Their table entries become spill ids (`SpilledBlock`), so a sequence's context may exceed the
pool; `free` gives the spill slots back.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tierlm.core.request import Request
from tierlm.kvcache.block_pool import BlockPool, KVBlock
from tierlm.kvcache.hashing import BlockHash, hash_request_blocks
from tierlm.kvcache.spill import SpillStore
from tierlm.kvcache.tiers.controller import BlockRef, LoadJob, LowerHit, TierController

PIN_TABLE = "__pinned__"  # the pseudo request id whose table holds pinned prefix blocks


@dataclass(frozen=True)
class SpilledBlock:
    """A table entry whose KV was spilled out of the pool (kvcache/spill.py): block_id is its spill id."""

    block_id: int
    block_hash: None = None  # never a prefix-cache entry


@dataclass(frozen=True)
class KVCacheStats:
    """Counters since the manager was built. Queries and hits count tokens, evictions count blocks."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class KVCacheManager:
    """Block tables per request over one `BlockPool`, with optional prefix caching.

    `extra_keys` enter every block hash (model id, KV format, tenant salt): caches built with
    different keys or a different `hash_seed` never share blocks.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        hash_seed: int = 0,
        extra_keys: tuple = (),
        tiers: TierController | None = None,
        spill: SpillStore | None = None,
        spill_keep: tuple[int, int] = (0, 1),
    ):
        if block_size < 1:
            raise ValueError(f"block_size {block_size} < 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_seed = hash_seed
        self.extra_keys = tuple(extra_keys)
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # hashes of the request's leading full blocks
        self._num_cached: dict[str, int] = {}  # leading table entries already offered to the cache
        self._pending: list[KVBlock] = []  # blocks registered since the last commit_step
        self._queries = 0
        self._hits = 0
        self.tiers = tiers
        # Lower-tier probe per request: (hash of the first block probed, the run found or None).
        self._lower: dict[str, tuple[BlockHash, LowerHit | None]] = {}
        self._loads: dict[str, LoadJob] = {}
        self._pinned_hashes: set[BlockHash] = set()
        if tiers is not None:
            self.pool.eviction_log = []
        self.spill = spill
        self._spill_keep = spill_keep  # (sink blocks, window blocks) a sparse decode always reads: never spilled
        self._requests: dict[str, Request] = {}  # with a spill store: whose tables may be spilled from

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (some may still hold reusable cached KV)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, in [0, 1]."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def stats(self) -> KVCacheStats:
        return KVCacheStats(self._queries, self._hits, self.pool.num_evictions)

    def get_block_table(self, request_id: str) -> list[int]:
        """Block ids of the request in token order; [] for a request holding no blocks."""
        return [b.block_id for b in self._tables.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request, in full blocks: (block ids, num tokens they hold).

        Capped so at least one token is left to compute (its logits are needed), so a 32-token
        prompt with block_size 16 can hit at most one block. Takes no references: pass the ids to
        `allocate_slots` before any other allocation, or they may be evicted. Call it only for a
        request holding no blocks. The request's block hashes are kept for `allocate_slots`;
        `free` drops them, so free a probed request even if it never got blocks.
        Returns ([], 0) when prefix caching is off. The query and hit counters move when the request is
        first admitted (its first successful `allocate_slots`), so a request probed on several steps
        before it fits, or admitted again after a preemption, counts once: hit rate = cached prompt
        tokens / prompt tokens, per request, as the bench and the server report it.
        """
        if not self.enable_prefix_caching:
            return [], 0
        tokens = request.all_token_ids
        bs = self.block_size
        max_blocks = max(0, (len(tokens) - 1) // bs)
        hashes = self._block_hashes(request, tokens, max_blocks)
        hit: list[int] = []
        for i in range(max_blocks):
            block = self.pool.lookup(hashes[i], tokens[i * bs : (i + 1) * bs])
            if block is None:
                break
            hit.append(block.block_id)
        if self.tiers is not None and len(hit) < max_blocks:
            # One probe (and one load-or-recompute decision) per request and prefix position: a request that
            # waits for room is probed again every step. A block gone by the time it is loaded is a miss
            # then, and recomputed.
            prev = self._lower.get(request.request_id)
            if prev is None or prev[0] != hashes[len(hit)]:
                rest = range(len(hit), max_blocks)
                found = self.tiers.lookup([hashes[i] for i in rest], [tuple(tokens[i * bs:(i + 1) * bs]) for i in rest])
                if found is not None and not self.tiers.worth_loading(found):
                    found = None
                self._lower[request.request_id] = (hashes[len(hit)], found)
        return hit, len(hit) * bs

    def lower_hit(self, request: Request) -> LowerHit | None:
        """Blocks right after the device hit that lower tiers hold, from the last `get_computed_blocks`
        probe, when the cost model said loading them beats recomputing; else None."""
        probe = self._lower.get(request.request_id)
        return None if probe is None else probe[1]

    # ---- mutations -----------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Grow the request's block table to cover every token up to the end of this step.

        Blocks layout (B = block_size; '|' block borders):

            | table so far (already computed) | hit blocks (new_computed) | new tokens |      |
            |<-- request.num_computed_tokens ->|<-- len(hits) * B ------->|<- num_new ->|      |
            |<------------------------------- total ---------------------------------->| slack|
            blocks after the call: ceil(total / B); only the missing ones are taken from the pool

        `new_computed_blocks` (ids from `get_computed_blocks`) are accepted only on the first call,
        when request.num_computed_tokens == 0; the manager takes a reference on each.
        Returns the whole block table, or None when the free blocks do not suffice, in which case
        nothing changed (a ref-0 hit block counts as free until taken, so it is subtracted).
        Then, with prefix caching, every table block full of tokens [0, min(total, num_tokens)) is
        hashed and registered (pending until `commit_step`), reusing the hashes already computed.
        """
        rid = request.request_id
        bs = self.block_size
        table = self._tables.get(rid, [])
        hits = [self.pool.blocks[i] for i in new_computed_blocks]
        if hits:
            self._check_hits(request, table, hits)
        total = request.num_computed_tokens + len(hits) * bs + num_new_tokens
        num_needed = max(0, -(-total // bs) - len(table) - len(hits))
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        short = num_needed - (self.pool.num_free_blocks - num_free_hits)
        if short > 0 and (self.spill is None or not self._spill_cold(short, hits)):
            return None

        if self.spill is not None:
            self._requests[rid] = request
        if (self.enable_prefix_caching and rid not in self._tables and request.num_computed_tokens == 0
                and not request.num_preemptions):
            self._queries += request.num_tokens  # first admission: count this request's lookup once
            self._hits += len(hits) * bs
            request.cached_tokens_by_tier = {"device": len(hits) * bs}
        if hits and self.tiers is not None:
            self.tiers.note_hits([b.block_hash for b in hits])
        self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(num_needed)
        assert new_blocks is not None  # checked above
        self._demote_evicted()
        table = self._tables.setdefault(rid, table)
        table.extend(hits)
        table.extend(new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, table, min(total, request.num_tokens) // bs)
        return [b.block_id for b in table]

    def commit_step(self) -> None:
        """The step's forward pass wrote its KV: its registrations are final (stored in every tier with
        write-through; a pinned prefix's blocks take their pin reference)."""
        committed = [b for b in self._pending if b.block_hash is not None]
        self._pending.clear()
        if self._pinned_hashes:
            self._take_pins(committed)
        if self.tiers is not None and self.tiers.config.write_policy == "write_through" and committed:
            self.tiers.write_through([self._ref(b) for b in committed])

    def rollback_step(self) -> int:
        """The step's forward pass raised: drop the hashes registered since the last commit (their KV was
        never written), so no later request can hit them. Returns how many were dropped. The scheduler
        then restarts the step's requests (Scheduler.undo_step), which frees their blocks."""
        dropped = 0
        for block in self._pending:
            if block.block_hash is not None and self.pool.cached.get(block.block_hash) is block:
                self.pool.uncache(block)
                dropped += 1
        self._pending.clear()
        return dropped

    def free(self, request: Request) -> None:
        """Release the request's blocks tail-first (its last blocks become the first evicted) and
        forget everything kept for it (table, hashes). A no-op for an unknown request id."""
        rid = request.request_id
        job = self._loads.pop(rid, None)
        if job is not None:
            job.cancel()  # after this the loader never writes into the blocks freed below
        table = self._tables.pop(rid, None)
        self._hashes.pop(rid, None)
        self._num_cached.pop(rid, None)
        self._lower.pop(rid, None)
        self._requests.pop(rid, None)
        if table:
            spilled = [b.block_id for b in table if isinstance(b, SpilledBlock)]
            if spilled:
                self.spill.free(spilled)
                table = [b for b in table if not isinstance(b, SpilledBlock)]
            self.pool.free_blocks(reversed(table))

    # ---- spilling ------------------------------------------------------------------------------------
    def room(self, request: Request, new_computed_blocks: Sequence[int] = ()) -> int:
        """Tokens `allocate_slots(request, n, new_computed_blocks)` can take now: the slack in its last block,
        the free blocks and, with a spill store, the blocks it could spill. The scheduler caps a prefill chunk
        at this, so a context longer than the pool is prefilled chunk by chunk, spilling as it goes."""
        bs = self.block_size
        table = self._tables.get(request.request_id, [])
        hits = [self.pool.blocks[i] for i in new_computed_blocks]
        start = request.num_computed_tokens + len(hits) * bs
        slack = max(0, (len(table) + len(hits)) * bs - start)
        free = self.pool.num_free_blocks - sum(1 for b in hits if b.ref_cnt == 0)
        if self.spill is not None:
            free += min(self.spill.num_free, len(self._spill_candidates(hits)))
        return slack + max(0, free) * bs

    def _spill_candidates(self, keep: Sequence[KVBlock] = ()) -> list[tuple[str, int, KVBlock]]:
        """(request id, table position, block) of every block that may be spilled now."""
        sink, window = self._spill_keep
        bs = self.block_size
        kept = {b.block_id for b in keep}
        cands: list[tuple[str, int, KVBlock]] = []
        for rid, req in self._requests.items():
            if rid in self._loads:
                continue  # the loader thread may still be writing its blocks
            table = self._tables[rid]
            for i in range(sink, req.num_computed_tokens // bs - window):
                b = table[i]
                if isinstance(b, KVBlock) and b.ref_cnt == 1 and b.block_id not in kept:
                    cands.append((rid, i, b))
        return cands

    def _spill_cold(self, count: int, keep: Sequence[KVBlock] = ()) -> bool:
        """Spill `count` blocks of running sequences (see the module docstring) so the pool has room; False,
        changing nothing, when fewer can be spilled."""
        assert self.spill is not None
        if count > self.spill.num_free:
            return False
        cands = self._spill_candidates(keep)
        if len(cands) < count:
            return False
        last = self.spill.last_pick[[b.block_id for _, _, b in cands]].tolist()
        order = sorted(range(len(cands)), key=lambda j: (last[j], cands[j][1]))[:count]
        chosen = [cands[j] for j in order]
        ids = self.spill.spill([b.block_id for _, _, b in chosen])
        for (rid, i, _), sid in zip(chosen, ids):
            self._tables[rid][i] = SpilledBlock(sid)
        self.pool.free_blocks([b for _, _, b in chosen])
        return True

    # ---- lower tiers -------------------------------------------------------------------------------
    def start_load(self, request: Request, device_hits: Sequence[int], lower: LowerHit) -> LoadJob | None:
        """First allocation of a request whose prefix continues below the device pool: take the device hit
        blocks, allocate one fresh block per lower-tier block, and start loading into them (loader thread).
        None, changing nothing, when the pool lacks the blocks. The fresh blocks are registered only by
        `finish_load`, once their KV is verified and written."""
        rid = request.request_id
        assert self.tiers is not None and rid not in self._tables
        hits = [self.pool.blocks[i] for i in device_hits]
        self._check_hits(request, [], hits)
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if len(lower) > self.pool.num_free_blocks - num_free_hits:
            return None
        if request.num_computed_tokens == 0 and not request.num_preemptions:
            self._queries += request.num_tokens
        if hits:
            self.tiers.note_hits([b.block_hash for b in hits])
        self.pool.touch(hits)
        new_blocks = self.pool.get_new_blocks(len(lower))
        assert new_blocks is not None
        # Demoting what the fresh blocks displaced stores into the tiers, whose evictions must not take the
        # entries this load is about to read: hold them (the loader releases them once read).
        self.tiers.hold(lower)
        self._demote_evicted()  # before the loader writes into blocks that held evicted KV
        self._tables[rid] = hits + new_blocks
        self._num_cached[rid] = len(hits)
        job = self.tiers.start_load(lower, [b.block_id for b in new_blocks])
        self._loads[rid] = job
        return job

    def load_ready(self, request: Request) -> bool:
        """The request's load finished, or ran past the load timeout (then `finish_load` recomputes)."""
        job = self._loads.get(request.request_id)
        if job is None:
            return True
        assert self.tiers is not None
        return job.event.is_set() or time.monotonic() - job.started > self.tiers.config.load_timeout_s

    def finish_load(self, request: Request) -> int:
        """Settle the request's load: register the blocks that loaded, count hits by tier. Returns the
        tokens whose KV is now in the request's blocks (device hits + loaded); the rest is recomputed."""
        rid = request.request_id
        job = self._loads.pop(rid)
        assert self.tiers is not None
        loaded = self.tiers.finish_load(job)
        table, start = self._tables[rid], self._num_cached[rid]
        hashes, tokens, bs = self._hashes[rid], request.all_token_ids, self.block_size
        registered = []
        for i in range(start, start + loaded):
            if self.pool.cache_block(table[i], hashes[i], tokens[i * bs:(i + 1) * bs]):
                registered.append(table[i])
        if self._pinned_hashes:
            self._take_pins(registered)
        self._num_cached[rid] = start + loaded
        self._lower.pop(rid, None)
        if request.num_computed_tokens == 0 and not request.num_preemptions:
            self._hits += (start + loaded) * bs
            request.cached_tokens_by_tier = {"device": start * bs}
            for name, n in job.by_tier.items():
                request.cached_tokens_by_tier[name] = n * bs
        return (start + loaded) * bs

    def loading_requests(self) -> int:
        return len(self._loads)

    def wait_for_loads(self, timeout: float) -> None:
        """Block until some load finishes (or `timeout`): an engine with nothing else to run waits here
        instead of spinning."""
        jobs = list(self._loads.values())
        deadline = time.monotonic() + timeout
        while jobs and time.monotonic() < deadline:
            if any(j.event.is_set() for j in jobs):
                return
            jobs[0].event.wait(min(0.005, max(0.0, deadline - time.monotonic())))

    def offload(self, request: Request) -> bool:
        """Preemption by offload: store the request's full cached blocks in host memory, pinned until it
        is admitted again or finishes (`release_offload`). False when there is no host tier or no room."""
        if self.tiers is None:
            return False
        table = self._tables.get(request.request_id, [])
        refs = [self._ref(b) for b in table[: self._num_cached.get(request.request_id, 0)] if b.block_hash is not None]
        return self.tiers.offload(request.request_id, refs)

    def offload_cheaper(self, request: Request) -> bool:
        """The cost model's choice for a preemption: offloading and reloading the request's cached blocks
        beats recomputing its context."""
        if self.tiers is None:
            return False
        n = self._num_cached.get(request.request_id, 0)
        recompute = self.tiers.recompute_seconds(request.num_computed_tokens)
        return n > 0 and (recompute is None or self.tiers.offload_seconds(n) < recompute)

    def release_offload(self, request: Request) -> None:
        if self.tiers is not None:
            self.tiers.release(request.request_id)

    def note_prefill(self, tokens: int, seconds: float) -> None:
        if self.tiers is not None:
            self.tiers.note_prefill(tokens, seconds)

    def pin_prefix(self, token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        """Keep the full blocks of this prefix: one extra reference on their device blocks (taken now for
        blocks already cached, at commit for ones computed later) and a pin in every tier. Returns the
        number of blocks pinned."""
        extra = self.extra_keys + ((cache_salt,) if cache_salt else ())
        hashes = hash_request_blocks(list(token_ids), self.block_size, self.hash_seed, extra)
        self._pinned_hashes.update(hashes)
        self._take_pins([self.pool.cached[h] for h in hashes if h in self.pool.cached])
        if self.tiers is not None:
            for tier in self.tiers.tiers:
                tier.pin(hashes)
        return len(hashes)

    def unpin_all(self) -> None:
        pinned = self._tables.pop(PIN_TABLE, [])
        self.pool.free_blocks(pinned)
        if self.tiers is not None:
            for tier in self.tiers.tiers:
                tier.unpin(self._pinned_hashes)
        self._pinned_hashes.clear()

    def _take_pins(self, blocks: Sequence[KVBlock]) -> None:
        table = self._tables.setdefault(PIN_TABLE, [])
        held = {b.block_id for b in table}
        new = [b for b in blocks if b.block_hash in self._pinned_hashes and b.block_id not in held]
        self.pool.touch(new)
        table.extend(new)

    def _ref(self, block: KVBlock) -> BlockRef:
        assert block.block_hash is not None and block.token_ids is not None
        return BlockRef(block.block_id, block.block_hash, block.token_ids)

    def _demote_evicted(self) -> None:
        """Hand the blocks the pool just evicted to the tiers while their KV is still intact."""
        log = self.pool.eviction_log
        if not log:
            return
        pending = {b.block_id for b in self._pending}
        refs = [BlockRef(i, h, t) for i, h, t in log if i not in pending]
        log.clear()
        assert self.tiers is not None
        self.tiers.demote(refs)

    def reset_prefix_cache(self) -> int:
        """Drop every cached hash; blocks in use keep their KV. Returns the number dropped."""
        return self.pool.reset_prefix_cache()

    # ---- internals -----------------------------------------------------------------------------

    def _check_hits(self, request: Request, table: list[KVBlock], hits: list[KVBlock]) -> None:
        """Refuse hit blocks that are not this request's current cached prefix (stale or foreign):
        reusing them would silently attend to the wrong KV."""
        if table or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r}: new_computed_blocks only on the first allocation")
        hashes = self._hashes.get(request.request_id, [])
        for i, block in enumerate(hits):
            if i >= len(hashes) or block.block_hash != hashes[i]:
                raise ValueError(
                    f"request {request.request_id!r}: hit block {block.block_id} at position {i} is not the "
                    "cached prefix get_computed_blocks returned (evicted since, or from another request)"
                )

    def _block_hashes(self, request: Request, tokens: Sequence[int], num_blocks: int) -> list[BlockHash]:
        """The request's hash list, extended (and kept) to cover at least `num_blocks` full blocks.

        A request's cache_salt (tenant isolation) joins the engine-wide extra keys.
        """
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) < num_blocks:
            bs = self.block_size
            start = len(hashes) * bs
            hashes.extend(
                hash_request_blocks(
                    tokens[start : num_blocks * bs],
                    bs,
                    self.hash_seed,
                    self.extra_keys + ((request.cache_salt,) if request.cache_salt else ()),
                    start_parent=hashes[-1] if hashes else None,
                )
            )
        return hashes

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_full: int) -> None:
        rid = request.request_id
        start = self._num_cached.get(rid, 0)
        if num_full <= start:
            return
        tokens = request.all_token_ids
        hashes = self._block_hashes(request, tokens, num_full)
        bs = self.block_size
        for i in range(start, num_full):
            # False when another block already holds this prefix: this copy just stays uncached.
            block = table[i]
            fresh = block.block_hash is None
            if self.pool.cache_block(block, hashes[i], tokens[i * bs : (i + 1) * bs]) and fresh:
                self._pending.append(block)
        self._num_cached[rid] = num_full

    def check_integrity(self) -> None:
        """Assert the pool invariants plus: each block's ref count equals the number of tables
        holding it, no table holds a block twice, and per-request caching state is consistent."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        for rid, table in self._tables.items():
            ids = [b.block_id for b in table if not isinstance(b, SpilledBlock)]
            assert len(set(ids)) == len(ids), f"request {rid!r} holds a block twice: {ids}"
            holders.update(ids)
            num_cached = self._num_cached.get(rid, 0)
            assert num_cached <= len(table), f"request {rid!r}: {num_cached} cached blocks > table {len(table)}"
            assert num_cached <= len(self._hashes.get(rid, ())), f"request {rid!r}: cached blocks without hashes"
        for block in self.pool.blocks:
            assert block.ref_cnt == holders[block.block_id], (
                f"{block!r}: ref_cnt {block.ref_cnt} but held by {holders[block.block_id]} request(s)"
            )
        stray = set(self._num_cached) - set(self._tables)
        assert not stray, f"caching state kept for requests without blocks: {sorted(stray)}"
        loading = set(self._loads) - set(self._tables)
        assert not loading, f"loads in flight for requests without blocks: {sorted(loading)}"
        pinned = self._tables.get(PIN_TABLE, [])
        assert all(b.block_hash in self._pinned_hashes for b in pinned), "a pinned block lost its pinned hash"
        if self.tiers is not None:
            self.tiers.check_integrity()
