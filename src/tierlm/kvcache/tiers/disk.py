"""T2: a local directory, one file per entry.

    DIR/<first 2 hex chars of the key>/<key hex>.kv      the encoded entry (codec.py), nothing else
    DIR/<first 2 hex chars of the key>/.<key hex>.<pid>.<random>.tmp   a write under way

A write goes to a temp file in the entry's own folder, then `os.replace` renames it over the final name
(atomic on POSIX), so a reader sees the whole old file, the whole new one, or none. There is no fsync: a
crash (of the machine, not the process) may lose the most recent entries or leave a torn file, which the
codec's checksum rejects at load (CorruptEntry: the controller deletes it and recomputes).

On construction the tier creates DIR and rebuilds its index from the `.kv` files there, oldest mtime first
(loads do not touch files, so the order is the order of stores), so a restarted engine reuses what it
wrote. Leftover temp files of a crashed writer are deleted, files whose name is not a key are ignored, and
if the files exceed the capacity the policy's victims are deleted until they fit. A directory that cannot
be created, listed or written raises InvalidParameterError naming it.

Failures: a missing file is a miss, not an error. Any other I/O error raises OSError, which IndexedTier
counts and answers as a miss (or a rejected store). A full disk (ENOSPC) on a write first evicts the
policy's victims (enough for the entry, at least one; these are dropped, not handed back to the caller for
demotion) and retries once.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from tierlm.core.errors import InvalidParameterError
from tierlm.kvcache.tiers.base import IndexedTier

_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.kv")
_TEMP_NAME = re.compile(r"\..*\.tmp")


class DiskTier(IndexedTier):
    def __init__(self, directory: str | Path, capacity_bytes: int, policy: str = "lru"):
        super().__init__("disk", capacity_bytes, policy)
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._probe_writable()
            entries, stale = self._scan()
            for path in stale:
                path.unlink(missing_ok=True)
        except OSError as e:
            raise InvalidParameterError(
                f"disk KV cache directory {str(self.directory)!r} is not usable: {e.strerror or e}",
                "choose a writable --disk-cache-dir", param="disk_dir") from e
        self._rebuild_index(entries)

    # ---- raw verbs -------------------------------------------------------------------------------
    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values: list[bytes | None] = []
        for key in keys:
            try:
                with open(self._path(key), "rb") as f:
                    values.append(f.read())
            except FileNotFoundError:
                values.append(None)
        return values

    def _write(self, key: bytes, value: bytes) -> None:
        try:
            self._write_file(key, value)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self._evict_for(len(value))
            self._write_file(key, value)
        with self._lock:  # evicted or deleted by another thread while we wrote: do not leave an unindexed file
            if key not in self.index:
                self._remove(key)

    def _remove(self, key: bytes) -> None:
        self._path(key).unlink(missing_ok=True)

    def check_integrity(self) -> None:
        """Index invariants, plus: every indexed entry has a file of its indexed size and every entry file
        is indexed. Call it while no other thread uses the tier (an eviction deletes the file after it
        leaves the index)."""
        super().check_integrity()
        with self._lock:
            entries, _ = self._scan()
            on_disk = {key: st.st_size for key, st in entries}
            indexed = set(self.index.keys())
            for key in indexed - self._writing:
                assert key in on_disk, f"tier {self.name}: indexed entry {key.hex()[:8]} has no file"
                assert on_disk[key] == self.index.size(key), (
                    f"tier {self.name}: entry {key.hex()[:8]} file has {on_disk[key]} bytes, "
                    f"index says {self.index.size(key)}")
            unknown = set(on_disk) - indexed - self._writing
            assert not unknown, f"tier {self.name}: {len(unknown)} entry files are not indexed"

    # ---- helpers ---------------------------------------------------------------------------------
    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.directory / name[:2] / f"{name}.kv"

    def _probe_writable(self) -> None:
        """Raise OSError now if DIR cannot take a file (read-only, permissions), rather than at every store."""
        probe = self.directory / f".probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        probe.unlink()

    def _scan(self) -> tuple[list[tuple[bytes, os.stat_result]], list[Path]]:
        """(key, stat) of every entry file in its right folder, and the leftover temp files."""
        entries: list[tuple[bytes, os.stat_result]] = []
        stale: list[Path] = []
        for folder in self.directory.iterdir():
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for path in folder.iterdir():
                name = path.name
                if _TEMP_NAME.fullmatch(name):
                    stale.append(path)
                elif _ENTRY_NAME.fullmatch(name) and name.startswith(folder.name):
                    with contextlib.suppress(FileNotFoundError):  # deleted while we list
                        entries.append((bytes.fromhex(name[:64]), path.stat()))
        return entries, stale

    def _rebuild_index(self, entries: list[tuple[bytes, os.stat_result]]) -> None:
        entries.sort(key=lambda entry: entry[1].st_mtime_ns)
        for key, st in entries:
            self.index.insert(key, st.st_size)
        trimmed = []
        while self.index.used > self.capacity_bytes and (victim := self.index.victim(())) is not None:
            self.index.remove(victim)
            trimmed.append(victim)
        for victim in trimmed:
            self._safe_remove(victim)
        self.stats.evictions += len(trimmed)

    def _write_file(self, key: bytes, value: bytes) -> None:
        path = self._path(key)
        temp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(temp, "xb") as f:
                f.write(value)
            os.replace(temp, path)
        except OSError:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise

    def _evict_for(self, size: int) -> None:
        """The disk is full: drop the policy's victims (never pinned entries, nor ones being written) until
        `size` bytes are free in the index, at least one."""
        victims = []
        with self._lock:
            keep = self._pinned | self._writing | set(self._held)
            freed = 0
            while (freed < size or not victims) and (victim := self.index.victim(keep)) is not None:
                freed += self.index.size(victim)
                self.index.remove(victim)
                victims.append(victim)
            self.stats.evictions += len(victims)
        for victim in victims:
            self._safe_remove(victim)
