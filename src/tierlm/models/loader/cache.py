"""ModelCache: the directory of converted models (`$TIERLM_CACHE_DIR/models`, else the platform's user
cache dir `tierlm/models`). An entry appears all at once: it is written into a hidden temp dir next to
it and renamed into place, so a crash or error never leaves a partial entry. Every entry carries a
manifest (`tierlm-manifest.json`: size + xxh3_128 of each file, see manifest.py) written before the
rename; `verify` re-hashes the files against it, so bit rot inside a file is caught, not just a bad header."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from tierlm.models.loader.manifest import verify_manifest, write_manifest
from tierlm.paths import cache_root

log = logging.getLogger(__name__)
_PROBE_BYTES = 1 << 20
_STALE_SECONDS = 24 * 3600  # a temp dir this old is dead even if its pid was reused


def file_digest(path: Path, salt: str = "") -> str:
    """12 hex chars from size, mtime, the first and the last MiB: cheap, and changes when the file does."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{salt}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_PROBE_BYTES))
        if st.st_size > 2 * _PROBE_BYTES:
            fh.seek(-_PROBE_BYTES, os.SEEK_END)
            h.update(fh.read(_PROBE_BYTES))
    return h.hexdigest()[:12]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelCache:
    """Converted-model entries under `root` (default: cache_root() / "models")."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "models"

    def entry_for(self, source: Path, salt: str = "") -> Path:
        """The entry dir of a source file: <stem>-<digest>."""
        return self.root / f"{source.stem}-{file_digest(source, salt)}"

    def _sweep(self, entry: Path) -> None:
        """Remove temp/trash dirs that crashed processes left next to `entry`."""
        for stale in entry.parent.glob(f".{entry.name}.*"):
            try:
                pid = int(stale.name.rsplit(".", 1)[1].split("-")[1])
            except (IndexError, ValueError):
                pid = -1
            try:
                age = time.time() - stale.stat().st_mtime
            except FileNotFoundError:
                continue
            if pid < 0 or not _pid_alive(pid) or age > _STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)

    def discard(self, entry: Path) -> None:
        """Remove an entry (first renamed aside, so readers never see it half-deleted)."""
        if not entry.exists():
            return
        trash = entry.parent / f".{entry.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def verify(self, entry: Path) -> dict:
        """The entry's manifest, after checking every file it lists (present, same size, same xxh3_128).
        CorruptModelError naming the file when not: a missing manifest counts as damage too (entries
        written before manifests existed are rebuilt once)."""
        return verify_manifest(entry, fix=f"delete {entry} and load the model again to rebuild it")

    def build(self, entry: Path, write: Callable[[Path], None]) -> Path:
        """Run `write(tmp_dir)`, write the manifest of what it wrote, and move the result to `entry`
        atomically. On any error nothing is left. If another process finished the same entry first, its
        copy wins."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        self._sweep(entry)
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write(tmp)
            write_manifest(tmp)
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                log.info("another process built %s first; using its copy", entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return entry
