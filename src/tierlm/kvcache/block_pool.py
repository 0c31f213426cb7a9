"""The device block pool: every KV block, the free queue, and the prefix-cache map.

Invariants (all checked by `BlockPool.check_integrity`):
  * a block is in the free queue  <=>  its ref_cnt == 0;
  * block.block_hash is not None  <=>  the prefix map holds block.block_hash -> block
    (so a hash maps to exactly one block, and a cached block carries its token ids);
  * num_free_blocks + blocks in use == num_blocks.

A free block may still be cached: its KV stays valid until the block is handed out again, at which
point its hash leaves the map (an eviction). Eviction order is the free queue's order, see
`FreeBlockQueue`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tierlm.kvcache.hashing import BlockHash


class KVBlock:
    """One block of the paged KV cache (block_size token slots in every layer).

    `token_ids` are the tokens of a cached full block, kept to confirm a hash hit.
    `prev` / `next` are the free-queue links, owned by `FreeBlockQueue` (None when not queued).
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev: KVBlock | None = None
        self.next: KVBlock | None = None

    def __repr__(self) -> str:
        cached = f", hash={self.block_hash.hex()[:8]}" if self.block_hash is not None else ""
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, with head/tail sentinels; every operation is O(1) and
    allocates nothing (the links live in the blocks).

    Order: the head is popped (reused) first. Freed cached blocks are appended at the tail, so among
    them the least recently freed goes first; `BlockPool.free_blocks` appends in the order it is given,
    and the manager gives a finished request's blocks tail-first, so a sequence's last blocks are
    evicted before its prefix, which other requests share more often. Freed blocks that hold no cached
    prefix are put at the head (`appendleft`): reusing them costs no hit.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()):
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        """Head (next to be evicted) to tail."""
        node = self._head.next
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next

    def popleft(self) -> KVBlock:
        """Remove and return the head block. IndexError when empty."""
        block = self._head.next
        if block is self._tail or block is None:
            raise IndexError("pop from an empty FreeBlockQueue")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        """Put `block` (not already queued) at the tail: it will be evicted last."""
        if block.prev is not None or block.next is not None:
            raise ValueError(f"{block!r} is already in the free queue")
        last = self._tail.prev
        assert last is not None
        block.prev, block.next = last, self._tail
        last.next = block
        self._tail.prev = block
        self._len += 1

    def appendleft(self, block: KVBlock) -> None:
        """Put `block` (not already queued) at the head: it will be evicted first."""
        if block.prev is not None or block.next is not None:
            raise ValueError(f"{block!r} is already in the free queue")
        first = self._head.next
        assert first is not None
        block.prev, block.next = self._head, first
        first.prev = block
        self._head.next = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        """Unlink a queued `block` from anywhere in the queue."""
        prev, nxt = block.prev, block.next
        if prev is None or nxt is None:
            raise ValueError(f"{block!r} is not in the free queue")
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self._len -= 1

    def check_links(self) -> list[KVBlock]:
        """Walk head to tail asserting link consistency and no cycles; returns the blocks in order."""
        out: list[KVBlock] = []
        seen: set[int] = set()
        node = self._head
        while node.next is not self._tail:
            nxt = node.next
            assert nxt is not None, f"free queue broken after {node!r}: next is None"
            assert nxt.prev is node, f"free queue link mismatch: {nxt!r}.prev is not {node!r}"
            assert id(nxt) not in seen, f"{nxt!r} appears twice in the free queue"
            seen.add(id(nxt))
            out.append(nxt)
            node = nxt
        assert self._tail.prev is node, "free queue tail sentinel does not point at the last block"
        assert len(out) == self._len, f"free queue holds {len(out)} blocks but counts {self._len}"
        return out


class BlockPool:
    """Owns `num_blocks` preallocated blocks (ids 0..num_blocks-1, all ordinary), their free queue,
    and the prefix map `BlockHash -> KVBlock`. Knows nothing of requests."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks {num_blocks} < 1")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse the block
        # When a list, every eviction appends (block id, hash, token ids) before the hash is dropped, so the
        # KV manager can demote the block's KV to a lower tier before anything overwrites it.
        self.eviction_log: list[tuple[int, BlockHash, tuple[int, ...]]] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached or not: all can be handed out by `get_new_blocks`."""
        return len(self.free_queue)

    def get_new_blocks(self, n: int) -> list[KVBlock] | None:
        """Pop `n` blocks from the head of the free queue, each with ref_cnt 1 for the caller.

        A popped block that is still cached is evicted first (hash dropped, counted).
        Returns None, changing nothing, when fewer than `n` blocks are free.
        """
        if n > len(self.free_queue):
            return None
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                if self.eviction_log is not None:
                    assert block.token_ids is not None
                    self.eviction_log.append((block.block_id, block.block_hash, block.token_ids))
                self._evict(block)
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one reference on each block; a free (ref 0) block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVBlock]) -> None:
        """Drop one reference on each block; cached blocks reaching 0 join the free queue's tail in the
        given order (so the first one given is evicted first) and stay cached until evicted. Blocks that
        hold no cached prefix (a sequence's partial last block) go to the head: nothing can hit them, so
        they are reused before any cached block is evicted."""
        for block in blocks_in_eviction_order:
            if block.ref_cnt <= 0:
                raise ValueError(f"{block!r} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash, token_ids: Sequence[int]) -> bool:
        """Register a full block under `block_hash`, remembering its tokens for hit confirmation.

        Returns False (and leaves the block uncached) when another block already holds this hash,
        e.g. two requests computed the same prefix at once; the first one stays the shared copy.
        """
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise ValueError(f"{block!r} is already cached under another hash")
            return True
        if block_hash in self.cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached[block_hash] = block
        return True

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> KVBlock | None:
        """The cached block for `block_hash`, only if it stores exactly `token_ids`. Takes no ref."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (blocks in use keep their KV, just stop being shareable).
        Returns the number of hashes dropped; they do not count as evictions."""
        dropped = len(self.cached)
        for block in self.cached.values():
            block.block_hash = None
            block.token_ids = None
        self.cached.clear()
        return dropped

    def uncache(self, block: KVBlock) -> None:
        """Drop a cached block's hash (its KV cannot be trusted); not counted as an eviction. A free block
        that held a prefix moves to the queue's head, as a block holding none does."""
        self._evict(block)
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
            self.free_queue.appendleft(block)

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self.cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None

    def check_integrity(self) -> None:
        """Assert every pool invariant (see the module docstring); AssertionError names the broken one."""
        queued = self.free_queue.check_links()
        queued_ids = {b.block_id for b in queued}
        for i, block in enumerate(self.blocks):
            assert block.block_id == i, f"block at index {i} has id {block.block_id}"
            assert block.ref_cnt >= 0, f"{block!r} has a negative ref count"
            in_queue = block.block_id in queued_ids
            assert in_queue == (block.ref_cnt == 0), (
                f"{block!r}: in free queue = {in_queue}, but ref_cnt = {block.ref_cnt}"
            )
            if not in_queue:
                assert block.prev is None and block.next is None, f"{block!r} is not queued but has links"
            if block.block_hash is None:
                assert block.token_ids is None, f"{block!r} has token ids but no hash"
            else:
                assert self.cached.get(block.block_hash) is block, (
                    f"{block!r} carries a hash the prefix map does not map to it"
                )
                assert block.token_ids is not None, f"cached {block!r} has no token ids"
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, f"prefix map entry {block_hash.hex()[:8]} -> {block!r} mismatch"
            assert 0 <= block.block_id < self.num_blocks and self.blocks[block.block_id] is block, (
                f"prefix map points at a block the pool does not own: {block!r}"
            )
        in_use = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert in_use + len(queued) == self.num_blocks, (
            f"{in_use} in use + {len(queued)} free != {self.num_blocks} blocks"
        )
