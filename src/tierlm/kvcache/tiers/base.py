"""One lower KV tier behind one small, batched interface.

Keys are block hashes (kvcache/hashing.py: chained, seeded, with model id, KV format and tenant salt), so
an entry is valid across restarts and processes. Values are encoded entries (codec.py). Every verb takes
many keys, so a prefix lookup over N blocks is one round trip per tier:

    found   = tier.contains(keys)              # [bool]
    values  = tier.load(keys)                  # [bytes | None]   (None: not there, or the tier failed)
    evicted = tier.store(items, want_evicted)  # makes room by the tier's policy; returns what it evicted
    tier.delete(keys); tier.pin(keys); tier.unpin(keys); tier.check_integrity()
    tier.hold(keys); tier.release(keys)        # a load in flight: not evicted until it has read them

`IndexedTier` keeps the index (key -> bytes, in an EvictionPolicy), the byte capacity, pins and counters
for every tier; a backend implements four raw verbs (_read_many, _write, _remove, _exists_many) and may
override `contains` and `load` to batch them. A tier never raises to its caller for an I/O failure: it
counts the error, marks itself unhealthy if the failure says the backend is gone, and answers as a miss.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

from tierlm.kvcache.tiers.policy import EvictionPolicy, make_policy

# Upper bounds (seconds) of the load-latency histogram buckets, Prometheus-style (cumulative on export).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class TierStats:
    """Counters of one tier since it was built. Blocks and bytes; the controller adds tokens."""

    lookups: int = 0  # keys asked by contains
    found: int = 0  # of those, present
    loads: int = 0  # entries returned by load
    bytes_loaded: int = 0
    stores: int = 0  # entries written
    bytes_stored: int = 0
    evictions: int = 0  # entries removed to make room
    rejected: int = 0  # stores refused (larger than the tier, every entry pinned, backend failing)
    corrupt: int = 0  # entries found corrupt, truncated or foreign (deleted, treated as a miss)
    errors: int = 0  # backend failures (I/O error, timeout, connection refused)
    reconnects: int = 0  # times the tier became healthy again after a failure
    load_latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    load_seconds_sum: float = 0.0

    def observe_load(self, seconds: float) -> None:
        i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        self.load_latency[i] += 1
        self.load_seconds_sum += seconds

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v) for f in fields(self)}


class Tier:
    """The interface the controller uses. See the module docstring."""

    name: str = "tier"

    @property
    def capacity_bytes(self) -> int:
        raise NotImplementedError

    @property
    def used_bytes(self) -> int:
        raise NotImplementedError

    @property
    def num_entries(self) -> int:
        raise NotImplementedError

    @property
    def healthy(self) -> bool:
        return True

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        raise NotImplementedError

    def holds(self, keys: Sequence[bytes]) -> list[bool]:
        """What this process stored and still indexes: no round trip, no lookup counted (the controller asks
        this before storing, not to find a prefix)."""
        raise NotImplementedError

    def load(self, keys: Sequence[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    def store(self, items: Sequence[tuple[bytes, bytes]], want_evicted: bool = False) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError

    def delete(self, keys: Iterable[bytes]) -> None:
        raise NotImplementedError

    def pin(self, keys: Iterable[bytes]) -> None:
        raise NotImplementedError

    def hold(self, keys: Iterable[bytes]) -> None:
        """Keep these entries from eviction until `release` (counted: loads may overlap)."""

    def release(self, keys: Iterable[bytes]) -> None:
        """Undo one `hold` of these keys."""

    def unpin(self, keys: Iterable[bytes]) -> None:
        raise NotImplementedError

    def check_integrity(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Unevictable:
    """Keys a store may not evict: pinned ones, ones whose write is still under way, and ones a load is about
    to read (held)."""

    __slots__ = ("pinned", "writing", "held")

    def __init__(self, pinned: set[bytes], writing: set[bytes], held=()):
        self.pinned, self.writing, self.held = pinned, writing, held

    def __contains__(self, key: object) -> bool:
        return key in self.pinned or key in self.writing or key in self.held


class TierUnavailable(Exception):
    """Raised by a backend's raw verb when the backend itself is gone (connection refused, timeout), as
    opposed to one bad entry; the tier turns unhealthy and retries with backoff."""


class IndexedTier(Tier):
    """Index, capacity, pins, counters and health for a backend that stores bytes under keys.

    Thread-safe: the controller's engine thread, loader and writer call it concurrently. The index lock is
    held for index changes only, not for a backend's I/O on reads.
    """

    BACKOFF_START_S = 0.25
    BACKOFF_MAX_S = 30.0

    def __init__(self, name: str, capacity_bytes: int, policy: str = "lru"):
        if capacity_bytes < 1:
            raise ValueError(f"tier {name!r}: capacity {capacity_bytes} < 1 byte")
        self.name = name
        self.index: EvictionPolicy = make_policy(policy, capacity_bytes)
        self.stats = TierStats()
        self._pinned: set[bytes] = set()
        self._writing: set[bytes] = set()  # indexed keys whose backend write is still under way
        self._held: Counter[bytes] = Counter()  # keys a load in flight will read (TierController.start_load)
        self._lock = threading.RLock()
        self._down_until = 0.0  # monotonic time before which the tier answers every call as a miss
        self._backoff = 0.0
        self.last_error = ""

    # ---- raw verbs a backend implements ----------------------------------------------------------
    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    def _write(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def _remove(self, key: bytes) -> None:
        raise NotImplementedError

    # ---- health ------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, err: BaseException) -> None:
        """Count a backend failure; a TierUnavailable also takes the tier down for a growing backoff."""
        with self._lock:
            self.stats.errors += 1
            self.last_error = f"{type(err).__name__}: {err}"
            if isinstance(err, TierUnavailable):
                self._backoff = min(self.BACKOFF_MAX_S, max(self.BACKOFF_START_S, 2 * self._backoff))
                self._down_until = time.monotonic() + self._backoff

    def _succeeded(self) -> None:
        if self._backoff:
            with self._lock:
                if self._backoff:
                    self._backoff = 0.0
                    self.stats.reconnects += 1
                    self._reconnected()

    def _reconnected(self) -> None:
        """The backend answers again after a failure (called under the lock). A backend whose contents may
        have been lost meanwhile (a restarted server) forgets its index here, so entries are written again."""

    # ---- the interface -------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.index.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.index.used

    @property
    def num_entries(self) -> int:
        return len(self.index)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            self.stats.lookups += len(keys)
            if not self.healthy:
                return [False] * len(keys)
            found = [k in self.index for k in keys]
            self.stats.found += sum(found)
            return found

    def holds(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self.index for k in keys]

    def load(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        if not self.healthy:
            return [None] * len(keys)
        with self._lock:  # a key still being written may read as missing: never drop it for that
            in_flight = {k for k in keys if k in self._writing}
        t0 = time.perf_counter()
        try:
            values = self._read_many(keys)
        except (TierUnavailable, OSError) as e:
            self._failed(e)
            return [None] * len(keys)
        self._succeeded()
        with self._lock:
            for k, v in zip(keys, values):
                if v is not None:
                    self.stats.loads += 1
                    self.stats.bytes_loaded += len(v)
                    if k in self.index:
                        self.index.touch(k)
                elif k in self.index and k not in self._writing and k not in in_flight:  # gone behind our back
                    self.index.remove(k)
            self.stats.observe_load(time.perf_counter() - t0)
        return values

    def store(self, items: Sequence[tuple[bytes, bytes]], want_evicted: bool = False) -> list[tuple[bytes, bytes]]:
        evicted: list[tuple[bytes, bytes]] = []
        if not items:
            return evicted
        if not self.healthy:
            with self._lock:
                self.stats.rejected += len(items)
            return evicted
        for key, value in items:
            size = len(value)
            with self._lock:
                if key in self.index:
                    self.index.touch(key)
                    continue
                if size > self.capacity_bytes:
                    self.stats.rejected += 1
                    continue
                victims = []
                while self.index.used + size > self.capacity_bytes:
                    victim = self.index.victim(_Unevictable(self._pinned, self._writing, self._held))
                    if victim is None:
                        break
                    victims.append((victim, self.index.size(victim)))
                    self.index.remove(victim)
                if self.index.used + size > self.capacity_bytes:  # everything left is pinned
                    self.stats.rejected += 1
                    # give the victims back their places (they were not removed from the backend yet)
                    for victim, vsize in victims:
                        self.index.insert(victim, vsize)
                    continue
                self.index.insert(key, size)  # reserve the room before the (unlocked) I/O
                self._writing.add(key)
            if victims:
                if want_evicted:
                    values = self._safe_read([v for v, _ in victims])
                    evicted.extend((k, v) for (k, _), v in zip(victims, values) if v is not None)
                for victim, _ in victims:
                    self._safe_remove(victim)
                with self._lock:
                    self.stats.evictions += len(victims)
            try:
                self._write(key, value)
            except (TierUnavailable, OSError) as e:
                self._failed(e)
                with self._lock:
                    self._writing.discard(key)
                    if key in self.index:
                        self.index.remove(key)
                    self.stats.rejected += 1
                if isinstance(e, TierUnavailable):
                    with self._lock:
                        self.stats.rejected += len(items) - 1  # the backend is gone: drop the rest at once
                    break
                continue
            self._succeeded()
            with self._lock:
                self._writing.discard(key)
                self.stats.stores += 1
                self.stats.bytes_stored += size
        return evicted

    def delete(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            with self._lock:
                if key in self.index:
                    self.index.remove(key)
                self._pinned.discard(key)
            self._safe_remove(key)

    def discard_corrupt(self, key: bytes) -> None:
        """A loaded entry failed its checks: count it and delete it, so it is not offered again."""
        with self._lock:
            self.stats.corrupt += 1
        self.delete([key])

    def pin(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._pinned.update(keys)

    def unpin(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._pinned.difference_update(keys)

    def is_pinned(self, key: bytes) -> bool:
        return key in self._pinned

    def hold(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._held.update(keys)

    def release(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._held.subtract(keys)
            for k in [k for k, n in self._held.items() if n <= 0]:
                del self._held[k]

    def check_integrity(self) -> None:
        """Index bytes add up and stay within capacity; subclasses add backend checks."""
        with self._lock:
            total = sum(self.index.size(k) for k in self.index.keys())
            assert total == self.index.used, f"tier {self.name}: index sums to {total} bytes, counts {self.index.used}"
            assert self.index.used <= self.capacity_bytes, (
                f"tier {self.name}: {self.index.used} bytes used > capacity {self.capacity_bytes}")

    # ---- helpers ---------------------------------------------------------------------------------
    def _safe_read(self, keys: Sequence[bytes]) -> list[bytes | None]:
        try:
            return self._read_many(keys)
        except (TierUnavailable, OSError) as e:
            self._failed(e)
            return [None] * len(keys)

    def _safe_remove(self, key: bytes) -> None:
        try:
            self._remove(key)
        except (TierUnavailable, OSError) as e:
            self._failed(e)
