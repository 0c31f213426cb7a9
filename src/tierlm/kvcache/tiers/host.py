"""T1: host memory. Entries are Python bytes objects in a dict, indexed by the tier's policy.

On CUDA the controller gathers evicted blocks through a pinned staging buffer (KVStorage.gather_blocks
with pin_memory) before they become entries here; loads copy back through the same path.
"""
from __future__ import annotations

from collections.abc import Sequence

from tierlm.kvcache.tiers.base import IndexedTier


class HostTier(IndexedTier):
    def __init__(self, capacity_bytes: int, policy: str = "lru"):
        super().__init__("host", capacity_bytes, policy)
        self._data: dict[bytes, bytes] = {}

    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            return [self._data.get(k) for k in keys]

    def _write(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._data[key] = value

    def _remove(self, key: bytes) -> None:
        with self._lock:
            self._data.pop(key, None)

    def check_integrity(self) -> None:
        super().check_integrity()
        with self._lock:
            assert set(self._data) == set(self.index.keys()), f"tier {self.name}: stored keys differ from the index"
            for k, v in self._data.items():
                assert len(v) == self.index.size(k), f"tier {self.name}: entry {k.hex()[:8]} size differs from the index"
