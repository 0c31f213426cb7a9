"""FreeBlockQueue order and O(1) ops; BlockPool allocation, eviction, caching, and its integrity checker."""
import pytest

from tierlm.kvcache.block_pool import BlockPool, FreeBlockQueue, KVBlock
from tierlm.kvcache.hashing import BlockHash, hash_block_tokens


def ids(blocks):
    return [b.block_id for b in blocks]


def h(n: int) -> BlockHash:
    return hash_block_tokens(None, [n])


# ---- FreeBlockQueue -----------------------------------------------------------------------------

def test_queue_order_popleft_append_remove():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert ids(q) == [0, 1, 2, 3, 4] and len(q) == 5
    q.remove(blocks[2])  # from the middle
    assert ids(q) == [0, 1, 3, 4] and len(q) == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert ids(q) == [1, 3, 4, 2, 0]
    q.remove(blocks[0])  # the tail
    q.remove(blocks[1])  # the head
    assert ids(q) == [3, 4, 2] and len(q) == 3
    assert q.check_links() == [blocks[3], blocks[4], blocks[2]]


def test_queue_misuse_is_refused():
    a, b = KVBlock(0), KVBlock(1)
    q = FreeBlockQueue([a])
    with pytest.raises(ValueError):
        q.append(a)  # already queued
    with pytest.raises(ValueError):
        q.remove(b)  # never queued
    q.popleft()
    with pytest.raises(IndexError):
        q.popleft()
    assert len(q) == 0 and list(q) == []


def test_queue_ops_do_not_allocate_nodes():
    blocks = [KVBlock(i) for i in range(3)]
    q = FreeBlockQueue(blocks)
    b = q.popleft()
    assert b.prev is None and b.next is None
    q.append(b)
    assert q.check_links()[-1] is b  # the same object is relinked


# ---- BlockPool ----------------------------------------------------------------------------------

def test_get_new_blocks_hands_out_the_head_with_one_ref():
    pool = BlockPool(4)
    got = pool.get_new_blocks(3)
    assert ids(got) == [0, 1, 2] and [b.ref_cnt for b in got] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_get_new_blocks_short_returns_none_and_changes_nothing():
    pool = BlockPool(4)
    pool.get_new_blocks(2)
    assert pool.get_new_blocks(3) is None
    assert pool.num_free_blocks == 2 and ids(pool.free_queue) == [2, 3]
    assert pool.get_new_blocks(0) == []
    pool.check_integrity()


def cache_all(pool, blocks):
    for b in blocks:
        assert pool.cache_block(b, h(100 + b.block_id), [b.block_id])


def test_free_appends_in_the_given_order_and_eviction_is_lru():
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)  # 0 1 2
    b = pool.get_new_blocks(3)  # 3 4 5
    cache_all(pool, a + b)
    pool.free_blocks(reversed(a))
    pool.free_blocks(reversed(b))
    assert ids(pool.free_queue) == [2, 1, 0, 5, 4, 3]
    assert ids(pool.get_new_blocks(4)) == [2, 1, 0, 5]
    pool.check_integrity()


def test_uncached_blocks_are_reused_before_any_cached_block_is_evicted():
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)  # 0 1 2: 0 and 1 cached (full prefix blocks), 2 a partial tail
    b = pool.get_new_blocks(3)  # 3 4 5: 3 cached
    cache_all(pool, a[:2] + b[:1])
    pool.free_blocks(reversed(a))
    pool.free_blocks(reversed(b))
    # uncached blocks at the head, most recently freed first; cached ones at the tail in LRU order
    assert ids(pool.free_queue) == [4, 5, 2, 1, 0, 3]
    assert ids(pool.get_new_blocks(3)) == [4, 5, 2] and pool.num_evictions == 0
    assert ids(pool.get_new_blocks(1)) == [1] and pool.num_evictions == 1
    assert pool.lookup(h(100), [0]) is a[0] and pool.lookup(h(103), [3]) is b[0]
    pool.check_integrity()


def test_shared_block_is_freed_only_at_the_last_reference():
    pool = BlockPool(3)
    (blk,) = pool.get_new_blocks(1)
    pool.touch([blk])
    pool.free_blocks([blk])
    assert blk.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([blk])
    assert ids(pool.free_queue) == [0, 1, 2]  # uncached: back at the head
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([blk])
    pool.check_integrity()


def test_touch_takes_a_free_cached_block_out_of_the_queue():
    pool = BlockPool(4)
    got = pool.get_new_blocks(2)
    pool.cache_block(got[1], h(1), [1])
    pool.free_blocks(got)
    assert ids(pool.free_queue) == [0, 2, 3, 1]  # uncached 0 at the head, cached 1 at the tail
    pool.touch([pool.lookup(h(1), [1])])
    assert ids(pool.free_queue) == [0, 2, 3] and got[1].ref_cnt == 1
    pool.check_integrity()


def test_reusing_a_cached_block_evicts_its_hash_and_counts_it():
    pool = BlockPool(2)
    got = pool.get_new_blocks(2)
    pool.cache_block(got[0], h(0), [10, 11])
    pool.free_blocks(got)  # queue: 1 (uncached, at the head), 0 (cached)
    assert pool.lookup(h(0), [10, 11]) is got[0]  # still reusable while free
    assert ids(pool.get_new_blocks(1)) == [1]  # block 1 was not cached: no eviction
    assert pool.num_evictions == 0 and pool.lookup(h(0), [10, 11]) is got[0]
    assert ids(pool.get_new_blocks(1)) == [0]
    assert pool.lookup(h(0), [10, 11]) is None
    assert got[0].block_hash is None and got[0].token_ids is None
    assert pool.num_evictions == 1
    pool.check_integrity()


def test_lookup_needs_equal_tokens():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    assert pool.cache_block(blk, h(0), [1, 2, 3])
    assert pool.lookup(h(0), [1, 2, 3]) is blk
    assert pool.lookup(h(0), [1, 2, 4]) is None  # same hash, different tokens: a collision, not a hit
    assert pool.lookup(h(1), [1, 2, 3]) is None


def test_second_block_with_a_cached_hash_stays_uncached():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, h(0), [1])
    assert not pool.cache_block(b, h(0), [1])
    assert b.block_hash is None and pool.lookup(h(0), [1]) is a
    with pytest.raises(ValueError):
        pool.cache_block(a, h(1), [1])
    pool.check_integrity()


def test_reset_prefix_cache_drops_every_hash():
    pool = BlockPool(3)
    got = pool.get_new_blocks(3)
    for i, blk in enumerate(got):
        pool.cache_block(blk, h(i), [i])
    pool.free_blocks(got[:2])
    assert pool.reset_prefix_cache() == 3
    assert pool.cached == {} and all(b.block_hash is None for b in pool.blocks)
    assert pool.num_evictions == 0
    pool.check_integrity()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: setattr(p.blocks[3], "ref_cnt", 1), "in free queue = True"),
        (lambda p: setattr(p.blocks[0], "ref_cnt", 0), "in free queue = False"),
        (lambda p: p.cached.__setitem__(h(9), p.blocks[1]), "mismatch"),
        (lambda p: setattr(p.blocks[2], "block_hash", h(8)), "prefix map does not map"),
        (lambda p: setattr(p.blocks[3], "next", p.blocks[3]), "link mismatch"),
        (lambda p: setattr(p.free_queue, "_len", 5), "counts 5"),
    ],
)
def test_check_integrity_catches_corruption(corrupt, message):
    pool = BlockPool(5)
    got = pool.get_new_blocks(3)
    pool.cache_block(got[0], h(0), [0])
    pool.check_integrity()
    corrupt(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check_integrity()
