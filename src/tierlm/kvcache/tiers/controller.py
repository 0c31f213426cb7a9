"""TierController: moves KV blocks between the device pool (T0) and the lower tiers (T1 host, T2 disk,
T3 Redis), off the engine thread where it can, and decides when a load is worth it.

The KV manager is its only caller. Verbs, by who calls them and when:

    lookup(keys, tokens)        engine thread, on a device miss: one `contains` per tier over the rest of
                                the prefix; the longest run of consecutive blocks found somewhere
    worth_loading(hit, n)       engine thread: the cost model (measured bandwidth per tier vs measured
                                prefill speed) says loading beats recomputing those tokens
    start_load(hit, block_ids)  engine thread: submit the load (fetch, verify, scatter into fresh blocks) to
                                the loader thread; `LoadJob.wait(s)` bounds a step's wait, `cancel()` a
                                late one (a cancelled job never writes into the blocks)
    demote(blocks)              engine thread, when the device pool evicts cached blocks (write-back):
                                their KV is gathered before anything overwrites it and stored in T1; T1's
                                evictions go to T2 and T2's to T3 (if admitted), on the writer thread
    write_through(blocks)       after a step computed new full blocks (write_through policy)
    offload(blocks) / release   a preempted sequence's blocks, stored in T1 and pinned until it resumes

Admission: disk and Redis take a block only after it was hit `admit_after_hits` times (device or lower
tier hits, counted here); a block held in host memory is copied down as soon as it reaches that count.
Everything a tier returns is checked by the codec (header, checksum, model, KV format, layout, token ids):
a failed check deletes the entry, counts it and ends the loaded run there; the rest is recomputed.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from tierlm.config import TierConfig
from tierlm.kvcache.storage import KVStorage
from tierlm.kvcache.tiers.base import Tier, TierStats
from tierlm.kvcache.tiers.codec import CorruptEntry, EntryIdentity, decode_entry, encode_entry

log = logging.getLogger(__name__)

# Prior guesses for the cost model until the first measurements arrive (bytes/s, seconds per call).
_PRIOR_BANDWIDTH = {"host": 2e9, "disk": 1e9, "redis": 3e8}  # whole loads: fetch, checks, scatter
_PRIOR_LATENCY = {"host": 1e-4, "disk": 1e-3, "redis": 2e-3}
_EMA = 0.3  # weight of a new measurement
_WRITE_QUEUE_ITEMS = 4096  # entries waiting for disk/Redis; beyond this new ones are dropped (counted)
_HIT_COUNTS = 1 << 20  # block hashes whose hit counts are remembered (admission), oldest forgotten


@dataclass(frozen=True)
class BlockRef:
    """A device block the controller reads: its id, hash and token ids."""

    block_id: int
    key: bytes
    token_ids: tuple[int, ...]


@dataclass
class LowerHit:
    """A run of consecutive blocks found below the device pool, in prefix order."""

    keys: list[bytes]
    token_ids: list[tuple[int, ...]]
    tiers: list[int]  # index into the controller's tiers, per block

    def __len__(self) -> int:
        return len(self.keys)

    def truncate(self, n: int) -> LowerHit:
        return LowerHit(self.keys[:n], self.token_ids[:n], self.tiers[:n])


@dataclass
class LoadJob:
    """One load in flight. `loaded` blocks (a prefix of the hit) hold verified KV once `done`."""

    hit: LowerHit
    block_ids: list[int]
    nbytes: int
    started: float = field(default_factory=time.monotonic)
    loaded: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)  # blocks loaded from each tier
    done: bool = False
    cancelled: bool = False
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    event: threading.Event = field(default_factory=threading.Event)
    copied: object = None  # CUDA: an event on the load stream after the copies into the blocks (else None)
    device: torch.device | None = None

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)

    def cancel(self) -> bool:
        """Stop the job from writing. True if it had already finished (its loaded blocks are usable). On CUDA
        the compute stream then waits for its copies (on the device, no host sync), before anything reads the
        blocks, or writes them once they are freed."""
        with self.lock:
            if self.done:
                if self.copied is not None:
                    torch.cuda.current_stream(self.device).wait_event(self.copied)
                    self.copied = None
                return True
            self.cancelled = True
            return False


@dataclass
class ControllerStats:
    """Counters of movement decisions (the tiers count their own traffic). Tokens unless named."""

    hit_tokens: dict[str, int] = field(default_factory=dict)  # loaded into the device, by tier
    miss_tokens: int = 0  # probed below the device and found nowhere
    fallback_cost: int = 0  # hits not loaded: the cost model said recompute is faster
    fallback_timeout: int = 0  # loads that missed their deadline: recomputed
    fallback_corrupt: int = 0  # loads cut short by a corrupt/foreign entry or a tier failing
    demoted_blocks: int = 0
    offloaded_blocks: int = 0  # stored for preempted sequences
    dropped_writes: int = 0  # writes to disk/Redis dropped because the writer queue was full
    load_jobs: int = 0
    sync_loads: int = 0  # loads a step waited for (within the step's byte budget)
    # Where the machinery's time goes: wall seconds inside the verbs the engine thread calls (what a step
    # pays), and CPU seconds of the loader and writer threads (what they take from compute on a small CPU).
    engine_seconds: float = 0.0
    loader_cpu_seconds: float = 0.0
    writer_cpu_seconds: float = 0.0


def _engine_verb(fn):
    """Time a verb the engine thread calls into stats.engine_seconds (outermost call only)."""
    @functools.wraps(fn)
    def timed(self, *args, **kwargs):
        if self._in_verb:
            return fn(self, *args, **kwargs)
        self._in_verb = True
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.stats.engine_seconds += time.perf_counter() - t0
            self._in_verb = False
    return timed


class TierController:
    def __init__(self, config: TierConfig, tiers: Sequence[Tier], storage: KVStorage, identity: EntryIdentity):
        if not tiers:
            raise ValueError("TierController needs at least one tier")
        self.config = config
        self.tiers = list(tiers)
        self.storage = storage
        self.identity = identity
        self.block_size = storage.spec.block_size
        self.stats = ControllerStats()
        self._in_verb = False
        # On CUDA the staging buffers between the device and host memory are pinned, so copies run at full
        # PCIe speed (and a device->host gather does not bounce through a pageable buffer).
        self._pin = storage.device.type == "cuda" and torch.cuda.is_available()
        # ... and a load's host-to-device copies and scatter run on a side stream, so they overlap the forward
        # pass on the compute stream, which waits for them (an event, no host sync) only at finish_load.
        self._stream = torch.cuda.Stream(storage.device) if self._pin else None
        probe = storage.gather_blocks([0], device="cpu")
        self._parts = [(name, t.dtype, tuple(t.shape[1:]), t[0].numel() * t.element_size()) for name, t in probe.items()]
        self.entry_payload_bytes = sum(nb for *_, nb in self._parts)
        self._hits: OrderedDict[bytes, int] = OrderedDict()
        self._hits_lock = threading.Lock()
        self._bandwidth = {t.name: _PRIOR_BANDWIDTH.get(t.name, 3e8) for t in self.tiers}
        self._latency = {t.name: _PRIOR_LATENCY.get(t.name, 2e-3) for t in self.tiers}
        self._prefill_tok_s: float | None = None
        self._offloaded: dict[str, list[bytes]] = {}  # request id -> keys pinned in the first tier
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierlm-kv-load")
        self._writes: queue.Queue = queue.Queue(maxsize=_WRITE_QUEUE_ITEMS)
        self._writer = threading.Thread(target=self._write_loop, name="tierlm-kv-write", daemon=True)
        self._writer.start()
        self._closed = False

    # ---- entries --------------------------------------------------------------------------------
    def _encode(self, refs: Sequence[BlockRef]) -> list[tuple[bytes, bytes]]:
        """Gather the blocks' KV (one index op per layer and part) and encode one entry per block."""
        if not refs:
            return []
        parts = self.storage.gather_blocks([r.block_id for r in refs], device="cpu", pin_memory=self._pin)
        raw = [t.view(torch.uint8).reshape(len(refs), -1).numpy() for t in parts.values()]
        return [(r.key, encode_entry(self.identity, r.token_ids, [memoryview(a[i]) for a in raw]))
                for i, r in enumerate(refs)]

    def _scatter(self, block_ids: Sequence[int], payloads: Sequence[memoryview]):
        """Write the payloads into the blocks. CUDA: asynchronously on the load stream; returns the event that
        follows the copies (the pinned staging buffer is held by torch's host allocator until it has passed)."""
        n = len(block_ids)
        buf = torch.empty((n, self.entry_payload_bytes), dtype=torch.uint8, pin_memory=self._pin)
        arr = buf.numpy()
        for i, p in enumerate(payloads):
            arr[i] = np.frombuffer(p, dtype=np.uint8)
        parts, off = {}, 0
        for name, dtype, shape, nb in self._parts:
            parts[name] = buf[:, off:off + nb].view(dtype).reshape(n, *shape)
            off += nb
        if self._stream is None:
            self.storage.scatter_blocks(block_ids, parts)
            return None
        with torch.cuda.stream(self._stream):
            self.storage.scatter_blocks(block_ids, parts, non_blocking=True)
            return self._stream.record_event()

    # ---- lookups and loads (engine thread) ---------------------------------------------------------
    @_engine_verb
    def lookup(self, keys: Sequence[bytes], token_ids: Sequence[tuple[int, ...]]) -> LowerHit | None:
        """The longest run of keys[0:] held by some lower tier: one `contains` per tier, each over the keys
        the tiers above it lack. None when keys[0] is nowhere."""
        if not keys:
            return None
        where: list[int | None] = [None] * len(keys)
        for ti, tier in enumerate(self.tiers):
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            found = tier.contains([keys[i] for i in todo])
            for i, f in zip(todo, found):
                if f:
                    where[i] = ti
        run = next((i for i, w in enumerate(where) if w is None), len(keys))
        self.stats.miss_tokens += (len(keys) - run) * self.block_size if run < len(keys) else 0
        if run == 0:
            return None
        return LowerHit(list(keys[:run]), [tuple(t) for t in token_ids[:run]], [w for w in where[:run]])

    def load_seconds(self, hit: LowerHit) -> float:
        """Estimated wall time to load the hit: per tier, a call's latency plus bytes over measured bandwidth."""
        per_tier: dict[int, int] = {}
        for ti in hit.tiers:
            per_tier[ti] = per_tier.get(ti, 0) + 1
        est = 0.0
        for ti, n in per_tier.items():
            name = self.tiers[ti].name
            est += self._latency[name] + n * self.entry_payload_bytes / self._bandwidth[name]
        return est

    def recompute_seconds(self, num_tokens: int) -> float | None:
        return None if self._prefill_tok_s is None else num_tokens / self._prefill_tok_s

    @_engine_verb
    def worth_loading(self, hit: LowerHit) -> bool:
        """Load only when it beats recomputing the same tokens (unknown prefill speed: load)."""
        recompute = self.recompute_seconds(len(hit) * self.block_size)
        if recompute is not None and self.load_seconds(hit) >= recompute:
            self.stats.fallback_cost += len(hit) * self.block_size
            return False
        return True

    def note_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill-only step's speed feeds the cost model."""
        if tokens >= self.block_size and seconds > 0:
            rate = tokens / seconds
            self._prefill_tok_s = rate if self._prefill_tok_s is None else (1 - _EMA) * self._prefill_tok_s + _EMA * rate

    def _by_tier(self, hit: LowerHit) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        for key, ti in zip(hit.keys, hit.tiers):
            out.setdefault(ti, []).append(key)
        return out

    def hold(self, hit: LowerHit) -> None:
        """Keep the hit's entries from eviction until the load has read them (call right before work that
        may evict, e.g. demoting the blocks the load's fresh blocks displace); `start_load` takes over."""
        for ti, keys in self._by_tier(hit).items():
            self.tiers[ti].hold(keys)

    @_engine_verb
    def start_load(self, hit: LowerHit, block_ids: Sequence[int]) -> LoadJob:
        """Load the hit into `block_ids` on the loader thread. The hit's entries must be held (`hold`); the
        loader releases them once it has read them."""
        job = LoadJob(hit, list(block_ids), len(hit) * self.entry_payload_bytes)
        self.stats.load_jobs += 1
        self._loader.submit(self._run_load, job)
        return job

    @_engine_verb
    def finish_load(self, job: LoadJob) -> int:
        """Settle a job: the number of leading blocks that hold verified KV (0 if it was cancelled late).
        Counts hit tokens by tier and notes the hits for admission."""
        usable = job.cancel()  # CUDA: the next forward pass reads the blocks after the load's copies
        if not usable:
            self.stats.fallback_timeout += len(job.hit) * self.block_size
            return 0
        if job.loaded < len(job.hit):
            self.stats.fallback_corrupt += (len(job.hit) - job.loaded) * self.block_size
        for name, n in job.by_tier.items():
            self.stats.hit_tokens[name] = self.stats.hit_tokens.get(name, 0) + n * self.block_size
        self.note_hits(job.hit.keys[:job.loaded])
        return job.loaded

    def _run_load(self, job: LoadJob) -> None:
        cpu0 = time.thread_time()
        held = self._by_tier(job.hit)
        try:
            values: list[bytes | None] = [None] * len(job.hit)
            fetch_s: dict[str, float] = {}
            for ti, tier in enumerate(self.tiers):
                idx = [i for i, t in enumerate(job.hit.tiers) if t == ti]
                if not idx:
                    continue
                t0 = time.perf_counter()
                try:
                    got = tier.load([job.hit.keys[i] for i in idx])
                finally:
                    tier.release(held.pop(ti, []))
                fetch_s[tier.name] = time.perf_counter() - t0
                for i, v in zip(idx, got):
                    values[i] = v
            t0 = time.perf_counter()
            payloads: list[memoryview] = []
            by_tier: dict[str, int] = {}
            where = list(job.hit.tiers)
            i = 0
            while i < len(values):
                tier = self.tiers[where[i]]
                payload = None
                if values[i] is None:
                    job.error = f"block {i} gone from {tier.name}"
                else:
                    try:
                        payload = decode_entry(values[i], self.identity, job.hit.token_ids[i])
                    except CorruptEntry as e:
                        log.warning("KV tier %s: entry %s unusable (%s); deleted, recomputing", tier.name,
                                    job.hit.keys[i].hex()[:12], e)
                        tier.discard_corrupt(job.hit.keys[i])
                        job.error = str(e)
                if payload is None:
                    # A bad or vanished entry: the tiers below may hold a good copy of the rest of the run.
                    below = where[i] + 1
                    if below >= len(self.tiers):
                        break
                    got = self.tiers[below].load(job.hit.keys[i:])  # one call for the rest of the run
                    for j, v in enumerate(got):
                        if v is not None or j == 0:  # block i moves down a tier even if missing there too
                            values[i + j], where[i + j] = v, below
                    continue
                payloads.append(payload)
                by_tier[tier.name] = by_tier.get(tier.name, 0) + 1
                i += 1
            with job.lock:
                if not job.cancelled and payloads:
                    job.copied, job.device = self._scatter(job.block_ids[:len(payloads)], payloads), self.storage.device
                    job.loaded = len(payloads)
                    job.by_tier = by_tier
                job.done = not job.cancelled
            # The cost model's bandwidth per tier covers the whole load: fetch, checks and the scatter
            # (shared out by blocks), which is what a request waits for.
            if payloads:
                post = (time.perf_counter() - t0) / len(payloads)
                for name, n in by_tier.items():
                    self._measure(name, n * self.entry_payload_bytes, fetch_s.get(name, 0.0) + n * post)
        except Exception as e:  # a bug here must not kill the loader thread: the request recomputes
            log.exception("KV tier load failed")
            with job.lock:
                job.error = f"{type(e).__name__}: {e}"
                job.loaded = 0
                job.done = not job.cancelled
        finally:
            for ti, keys in held.items():  # a failure before a tier was read: its holds end here too
                self.tiers[ti].release(keys)
            self.stats.loader_cpu_seconds += time.thread_time() - cpu0
            job.event.set()

    def _measure(self, tier: str, nbytes: int, seconds: float) -> None:
        if seconds > 0:
            self._bandwidth[tier] = (1 - _EMA) * self._bandwidth[tier] + _EMA * (nbytes / seconds)

    # ---- stores (engine thread in, writer thread down) -----------------------------------------------
    @_engine_verb
    def note_hits(self, keys: Sequence[bytes]) -> None:
        """Prefix hits on these blocks (device or lower tier). A host-held block reaching the admission
        count is copied down to disk/Redis now (selective write-through)."""
        n_admit = self.config.admit_after_hits
        promote: list[bytes] = []
        with self._hits_lock:
            for k in keys:
                c = self._hits.pop(k, 0) + 1
                self._hits[k] = c
                if n_admit and c == n_admit:
                    promote.append(k)
            while len(self._hits) > _HIT_COUNTS:
                self._hits.popitem(last=False)
        if promote and len(self.tiers) > 1 and self.tiers[0].name == "host":
            values = self.tiers[0].load(promote)
            self._enqueue(1, [(k, v) for k, v in zip(promote, values) if v is not None])

    def _admitted(self, key: bytes) -> bool:
        if not self.config.admit_after_hits:
            return True
        with self._hits_lock:
            return self._hits.get(key, 0) >= self.config.admit_after_hits

    @_engine_verb
    def demote(self, refs: Sequence[BlockRef]) -> None:
        """Blocks the device pool is evicting: store the ones the first tier lacks (write-back)."""
        present = self.tiers[0].holds([r.key for r in refs])
        refs = [r for r, p in zip(refs, present) if not p]
        if not refs:
            return
        self.stats.demoted_blocks += len(refs)
        self._store_from(0, self._encode(refs))

    @_engine_verb
    def write_through(self, refs: Sequence[BlockRef]) -> None:
        """Newly computed blocks, stored in every tier at once (admission still applies below host)."""
        if not refs:
            return
        entries = self._encode(refs)
        self._store_from(0, entries)
        if self.tiers[0].name == "host" and len(self.tiers) > 1:
            self._enqueue(1, entries)

    @_engine_verb
    def offload(self, request_id: str, refs: Sequence[BlockRef]) -> bool:
        """A preempted sequence's full blocks: store them in host memory and pin them until `release`.
        False (nothing pinned) when there is no host tier or it cannot take them all."""
        host = self.tiers[0]
        if host.name != "host" or not refs:
            return False
        keys = [r.key for r in refs]
        if len(refs) * self.entry_payload_bytes > host.capacity_bytes // 2:
            return False  # one sequence never pins more than half of the host tier
        present = host.holds(keys)
        missing = [r for r, p in zip(refs, present) if not p]
        host.pin(keys)  # pinned before the store so its evictions cannot take these
        self._store_from(0, self._encode(missing))
        if not all(host.holds(keys)):
            host.unpin(keys)
            return False
        self._offloaded[request_id] = keys
        self.stats.offloaded_blocks += len(missing)
        return True

    @_engine_verb
    def release(self, request_id: str) -> None:
        keys = self._offloaded.pop(request_id, None)
        if keys:
            still = {k for ks in self._offloaded.values() for k in ks}
            self.tiers[0].unpin([k for k in keys if k not in still])

    def offload_seconds(self, num_blocks: int) -> float:
        """Estimated cost of offloading and later reloading `num_blocks` through host memory."""
        host = self.tiers[0]
        if host.name != "host":
            return float("inf")
        nbytes = num_blocks * self.entry_payload_bytes
        return 2 * (self._latency["host"] + nbytes / self._bandwidth["host"])

    def _store_from(self, ti: int, entries: list[tuple[bytes, bytes]]) -> None:
        """Store in tier ti now if it is host memory (cheap), else on the writer thread; what it evicts
        goes one tier down, if admitted."""
        if not entries:
            return
        tier = self.tiers[ti]
        if tier.name != "host":
            self._enqueue(ti, entries)
            return
        has_next = ti + 1 < len(self.tiers) and self.config.write_policy == "write_back"
        evicted = tier.store(entries, want_evicted=has_next)
        if has_next:
            self._enqueue(ti + 1, [(k, v) for k, v in evicted if self._admitted(k)])

    def _enqueue(self, ti: int, entries: list[tuple[bytes, bytes]]) -> None:
        if self.config.admit_after_hits and ti > 0:
            entries = [(k, v) for k, v in entries if self._admitted(k)]
        if not entries or ti >= len(self.tiers):
            return
        try:
            self._writes.put_nowait((ti, entries))
        except queue.Full:
            self.stats.dropped_writes += len(entries)

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                self._writes.task_done()
                return
            ti, entries = item
            cpu0 = time.thread_time()
            try:
                tier = self.tiers[ti]
                has_next = ti + 1 < len(self.tiers) and self.config.write_policy == "write_back"
                evicted = tier.store(entries, want_evicted=has_next)
                if has_next and evicted:
                    self._enqueue(ti + 1, [(k, v) for k, v in evicted if self._admitted(k)])
                if self.config.write_policy == "write_through" and ti + 1 < len(self.tiers):
                    self._enqueue(ti + 1, entries)
            except Exception:  # never let the writer die: a lost write is only a future miss
                log.exception("KV tier write failed")
            finally:
                self.stats.writer_cpu_seconds += time.thread_time() - cpu0
                self._writes.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued disk/Redis writes are done (tests, shutdown). False on timeout."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def persist(self, refs: Sequence[BlockRef]) -> None:
        """Shutdown: write what only memory holds (these device blocks, and host entries) to the persistent
        tiers (disk, Redis; admission applies), so a restarted engine finds it. No-op without one."""
        durable = [i for i, t in enumerate(self.tiers) if t.name != "host"]
        if not durable or self._closed:
            return
        first = durable[0]
        have = self.tiers[first].holds([r.key for r in refs])
        self._enqueue(first, self._encode([r for r, h in zip(refs, have) if not h]))
        host = self.tiers[0]
        if host.name == "host":
            index = getattr(host, "index", None)
            keys = list(index.keys()) if index is not None else []
            have = self.tiers[first].holds(keys)
            missing = [k for k, h in zip(keys, have) if not h]
            for i in range(0, len(missing), 64):
                batch = missing[i:i + 64]
                self._enqueue(first, [(k, v) for k, v in zip(batch, host.load(batch)) if v is not None])

    def clear(self) -> None:
        """Drop every entry this engine can see in every tier (pins stay; pinned entries stay too) and the
        hit counts: benchmark repetitions start from the same cold tiers. Waits for queued writes first."""
        self.flush()
        for t in self.tiers:
            index = getattr(t, "index", None)
            if index is not None:
                t.delete([k for k in index.keys() if not t.is_pinned(k)])
        with self._hits_lock:
            self._hits.clear()

    # ---- visibility ---------------------------------------------------------------------------
    def tier_stats(self) -> dict[str, dict]:
        """Per tier: its counters plus capacity, use, health and this controller's token hits."""
        out = {}
        for t in self.tiers:
            s: TierStats = getattr(t, "stats", TierStats())
            d = s.as_dict()
            d.update(capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, entries=t.num_entries,
                     healthy=t.healthy, hit_tokens=self.stats.hit_tokens.get(t.name, 0),
                     bandwidth_bytes_per_s=self._bandwidth[t.name])
            out[t.name] = d
        return out

    def check_integrity(self) -> None:
        for t in self.tiers:
            t.check_integrity()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush(timeout=10.0)
        self._writes.put(None)
        self._writer.join(timeout=5.0)
        self._loader.shutdown(wait=True, cancel_futures=False)
        for t in self.tiers:
            t.close()
