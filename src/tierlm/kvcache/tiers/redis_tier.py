"""T3: a Redis-compatible server (Redis or Valkey), shared by every engine process and replica that uses it.

    <namespace><key hex>  ->  the encoded entry (codec.py), a plain string value

Every verb is one round trip: `contains` is one pipeline of EXISTS (it asks the server, not the local
index, so a prefix another process stored is found), `load` is one MGET. A store is one SET per entry.
Keys on the server that this process did not store are fine: they load like any other.

Capacity is local: the index counts only the bytes this process stored (it cannot see other writers), and
when a store would exceed `capacity_bytes` the local policy's victims are DELeted. The server's own
`maxmemory` policy may evict anything at any time; an entry found gone by a load leaves the local index
(one only asked about by `contains` stays until the local policy evicts it).

Failures: the client does not retry (a call takes at most `timeout_s` per socket operation); the tier
retries with its own backoff. A refused connection, a timeout or a server still loading its data raise
TierUnavailable (the tier answers every call as a miss until the backoff passes); any other server error
(e.g. OOM over `maxmemory` with the noeviction policy) raises OSError with the server's message. Either is
counted by IndexedTier and answered as a miss or a rejected store; no redis exception reaches the caller.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tierlm.core.errors import InvalidParameterError
from tierlm.kvcache.tiers.base import IndexedTier, TierUnavailable

_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


class RedisTier(IndexedTier):
    def __init__(self, url: str, capacity_bytes: int, policy: str = "lru", timeout_s: float = 0.5,
                 namespace: str = "tierlm:kv:"):
        super().__init__("redis", capacity_bytes, policy)
        self.url = _without_password(url)  # for messages: last_error reaches logs and metrics
        self.namespace = namespace.encode()
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                retry=Retry(NoBackoff(), 0))
        except ValueError as e:
            raise InvalidParameterError(f"Redis URL {self.url!r} is not valid: {e}",
                                        "use redis://HOST:PORT[/DB] (Redis or Valkey)", param="redis_url") from e

    # ---- raw verbs -------------------------------------------------------------------------------
    def _exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._mapped_errors():
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._name(key))
            return [bool(n) for n in pipe.execute()]

    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._mapped_errors():
            return self._client.mget([self._name(k) for k in keys])

    def _write(self, key: bytes, value: bytes) -> None:
        with self._mapped_errors():
            self._client.set(self._name(key), value)
        with self._lock:
            gone = key not in self.index
        if gone:  # evicted or deleted by another thread while we wrote: do not leave an uncounted entry
            self._remove(key)

    def _remove(self, key: bytes) -> None:
        with self._mapped_errors():
            self._client.delete(self._name(key))

    # ---- the interface -------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """One round trip to the server; all False, without one, while the tier is down."""
        with self._lock:
            self.stats.lookups += len(keys)
        if not keys or not self.healthy:
            return [False] * len(keys)
        try:
            found = self._exists_many(keys)
        except (TierUnavailable, OSError) as e:
            self._failed(e)
            return [False] * len(keys)
        self._succeeded()
        with self._lock:
            self.stats.found += sum(found)
        return found

    def check_integrity(self) -> None:
        """Index invariants, plus (when the server answers): every indexed entry still on the server has its
        indexed size. Entries missing on the server are allowed (its maxmemory policy may evict them)."""
        super().check_integrity()
        if not self.healthy:
            return
        with self._lock:
            keys = [k for k in self.index.keys() if k not in self._writing]
            sizes = {k: self.index.size(k) for k in keys}
        try:
            with self._mapped_errors():
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(self._name(key))
                    pipe.strlen(self._name(key))
                replies = pipe.execute()
        except (TierUnavailable, OSError) as e:
            self._failed(e)
            return
        for key, there, length in zip(keys, replies[0::2], replies[1::2]):
            assert not there or length == sizes[key], (
                f"tier {self.name}: entry {key.hex()[:8]} has {length} bytes on the server, index says {sizes[key]}")

    def _reconnected(self) -> None:
        """The server may have restarted empty: forget the local index (pins stay), so the next stores write
        their entries again instead of trusting keys the server no longer has."""
        for key in list(self.index.keys()):
            if key not in self._writing:  # the write that found the server back is in it already
                self.index.remove(key)

    def close(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self._client.close()
            self._client.connection_pool.disconnect()

    # ---- helpers ---------------------------------------------------------------------------------
    def _name(self, key: bytes) -> bytes:
        return self.namespace + key.hex().encode()

    @contextlib.contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        """Turn the client's exceptions into the two a backend may raise (see the module docstring)."""
        try:
            yield
        except _UNAVAILABLE as e:
            raise TierUnavailable(f"Redis at {self.url}: {type(e).__name__}: {e}") from e
        except redis.exceptions.RedisError as e:
            raise OSError(f"Redis at {self.url}: {type(e).__name__}: {e}") from e


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
    except ValueError:
        return "<unparsable Redis URL>"
