"""Eviction policies inside one lower tier: which entry leaves when a store needs room.

Both keep an index key -> size (bytes) and answer `victim(pinned)`: the next entry to evict, skipping
pinned keys. Every operation is O(1) amortized except a victim search that has to skip pinned entries.

    lru     least recently stored or loaded first.
    s3fifo  S3-FIFO (Yang et al., SOSP'23): new keys enter a small FIFO (10% of the bytes); a key hit while
            there moves to the main FIFO when it reaches the head, a key never hit is evicted (its key kept
            in a ghost FIFO, so a quick return goes straight to main). Main is a FIFO with reinsertion: a key
            with a non-zero frequency (capped at 3) is moved to the tail and decremented instead of evicted.
            One-hit entries (a scan of unique prompts) leave quickly without pushing out a shared prefix
            that is hit again and again, which plain LRU does.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterator


class EvictionPolicy:
    """The index of one tier. Subclasses keep the order; `used` is the byte total of indexed entries."""

    name = "base"

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used = 0

    def __contains__(self, key: bytes) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def keys(self) -> Iterator[bytes]:
        raise NotImplementedError

    def size(self, key: bytes) -> int:
        raise NotImplementedError

    def insert(self, key: bytes, size: int) -> None:
        raise NotImplementedError

    def touch(self, key: bytes) -> None:
        """The entry was hit (loaded or stored again)."""
        raise NotImplementedError

    def remove(self, key: bytes) -> None:
        raise NotImplementedError

    def victim(self, pinned: Container[bytes]) -> bytes | None:
        """The key to evict next (not removed yet; the tier calls `remove`), None if every entry is pinned."""
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._order: OrderedDict[bytes, int] = OrderedDict()  # oldest first

    def __contains__(self, key: bytes) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def keys(self) -> Iterator[bytes]:
        return iter(list(self._order))

    def size(self, key: bytes) -> int:
        return self._order[key]

    def insert(self, key: bytes, size: int) -> None:
        if key in self._order:
            raise KeyError(f"{key.hex()[:8]} is already indexed")
        self._order[key] = size
        self.used += size

    def touch(self, key: bytes) -> None:
        self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self.used -= self._order.pop(key)

    def victim(self, pinned: Container[bytes]) -> bytes | None:
        for key in self._order:
            if key not in pinned:
                return key
        return None


class S3FIFOPolicy(EvictionPolicy):
    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._small: OrderedDict[bytes, int] = OrderedDict()
        self._main: OrderedDict[bytes, int] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._small_used = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._small or key in self._main

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def keys(self) -> Iterator[bytes]:
        return iter([*self._small, *self._main])

    def size(self, key: bytes) -> int:
        return self._small[key] if key in self._small else self._main[key]

    def insert(self, key: bytes, size: int) -> None:
        if key in self:
            raise KeyError(f"{key.hex()[:8]} is already indexed")
        if key in self._ghost:  # evicted from small recently and back: it is reused, keep it in main
            del self._ghost[key]
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_used += size
        self._freq[key] = 0
        self.used += size

    def touch(self, key: bytes) -> None:
        self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)

    def remove(self, key: bytes) -> None:
        if key in self._small:
            size = self._small.pop(key)
            self._small_used -= size
            if self._freq.get(key, 0) == 0:  # left without a hit: remember it, a return goes to main
                self._ghost[key] = None
                while len(self._ghost) > max(len(self), 16):
                    self._ghost.popitem(last=False)
        else:
            size = self._main.pop(key)
        self._freq.pop(key, None)
        self.used -= size

    def victim(self, pinned: Container[bytes]) -> bytes | None:
        # Promotions and reinsertions are bounded: every key moved is either demoted in frequency or leaves
        # small for good, and a queue whose every key is pinned is skipped once its pinned keys cycled.
        skipped = {"small": 0, "main": 0}
        for _ in range(4 * len(self) + 2):
            small_ok = self._small and skipped["small"] < len(self._small)
            main_ok = self._main and skipped["main"] < len(self._main)
            if not small_ok and not main_ok:
                return None
            take_small = small_ok and (self._small_used > self.SMALL_FRACTION * self.capacity_bytes or not main_ok)
            queue = self._small if take_small else self._main
            key = next(iter(queue))
            if key in pinned:
                queue.move_to_end(key)
                skipped["small" if take_small else "main"] += 1
                continue
            if take_small:
                if self._freq[key] > 0:  # hit while small: promote to main
                    size = self._small.pop(key)
                    self._small_used -= size
                    self._main[key] = size
                    self._freq[key] = 0
                    continue
                return key
            if self._freq[key] > 0:
                self._freq[key] -= 1
                self._main.move_to_end(key)
                continue
            return key
        return None


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    try:
        return POLICIES[name](capacity_bytes)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}: use one of {', '.join(POLICIES)}") from None
