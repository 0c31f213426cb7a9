"""Content digests: the manifest of a cache entry (size + xxh3_128 of every file, checked at each load so bit
rot in a cached model is caught and the entry rebuilt) and the weights digest of a checkpoint.

Manifest (`tierlm-manifest.json` inside the entry):
    {"version": 1, "hash": "xxh3_128",
     "files": {"model.safetensors": {"size": 538090408, "xxh3_128": "<32 hex>"}, "config.json": {...}, ...}}
File names are relative to the entry, with "/" separators; the manifest does not list itself.

Why xxh3_128: on the 540 MB default model (warm page cache, 2-core x86_64) it hashes in ~100 ms (~5 GB/s
end to end, of which ~63 ms is the read itself), vs ~200-300 ms for zlib.crc32, ~470-510 ms for sha256 and
~1 s for blake2b. It detects accidental damage (bit rot, truncation, torn writes); it is not a
cryptographic hash and does not defend against someone forging a file on purpose.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import xxhash

from tierlm.core.errors import CorruptModelError

MANIFEST_FILE = "tierlm-manifest.json"
MANIFEST_VERSION = 1
HASH_NAME = "xxh3_128"
CHUNK_BYTES = 8 << 20  # one reused read buffer: memory stays flat whatever the file size


def hash_file(path: Path) -> tuple[int, str]:
    """(size in bytes, xxh3_128 hex digest of the contents), read in CHUNK_BYTES chunks."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def combine_digests(digests: Iterable[str]) -> str:
    """One digest of several files' digests, in the order given (callers sort by file name). A single file's
    digest is returned unchanged, so a one-file model's weights digest is `xxhsum -H2` of that file."""
    digests = list(digests)
    if len(digests) == 1:
        return digests[0]
    return xxhash.xxh3_128(("tierlm-weights-v1\n" + "".join(d + "\n" for d in digests)).encode()).hexdigest()


def weights_digest(files: Iterable[Path], known: Mapping[str, str] | None = None) -> str:
    """The content digest of a checkpoint's weight files: sorted by file name, each hashed (or taken from
    `known`, file name -> digest, e.g. a verified manifest), then combined. Depends on the bytes only: not on
    paths, mtimes or the machine."""
    known = known or {}
    ordered = sorted((Path(f) for f in files), key=lambda p: p.name)
    return combine_digests(known[p.name] if p.name in known else hash_file(p)[1] for p in ordered)


def _entry_files(entry: Path) -> list[Path]:
    return sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(entry: Path) -> dict:
    """Hash every file under `entry` and write the manifest there (atomically). Returns the manifest."""
    files = {}
    for path in _entry_files(entry):
        size, digest = hash_file(path)
        files[path.relative_to(entry).as_posix()] = {"size": size, HASH_NAME: digest}
    manifest = {"version": MANIFEST_VERSION, "hash": HASH_NAME, "files": files}
    tmp = entry / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, entry / MANIFEST_FILE)
    return manifest


def read_manifest(entry: Path, fix: str) -> dict:
    """The manifest of `entry`, checked for shape only. CorruptModelError when missing or malformed."""
    path = entry / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptModelError(f"{MANIFEST_FILE} is missing from {entry} (damaged, or written by an older tierlm)",
                                fix) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"{path} is unreadable: {exc}", fix) from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or not files or manifest.get("version") != MANIFEST_VERSION
            or manifest.get("hash") != HASH_NAME
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get(HASH_NAME), str)
                       for v in files.values())):
        raise CorruptModelError(f"{path} is malformed or of an unknown version/hash", fix)
    return manifest


def verify_manifest(entry: Path, fix: str) -> dict:
    """Check every file the manifest of `entry` lists: present, same size, same digest. Returns the manifest;
    raises CorruptModelError naming the first bad file. Files the manifest does not list are ignored."""
    manifest = read_manifest(entry, fix)
    for name, want in sorted(manifest["files"].items()):
        path = entry / name
        try:
            if not path.is_file():
                raise FileNotFoundError(path)
            size = path.stat().st_size
            if size != want["size"]:
                raise CorruptModelError(f"{name} in {entry} has {size} bytes, the manifest says {want['size']}", fix)
            _, digest = hash_file(path)
        except OSError as exc:
            raise CorruptModelError(f"{name} in {entry} is missing or unreadable ({exc})", fix) from exc
        if digest != want[HASH_NAME]:
            raise CorruptModelError(f"{name} in {entry} is damaged: its {HASH_NAME} is {digest}, "
                                    f"the manifest says {want[HASH_NAME]}", fix)
    return manifest


def manifest_digests(manifest: dict) -> dict[str, str]:
    """File name -> digest, from a (verified) manifest."""
    return {name: rec[HASH_NAME] for name, rec in manifest["files"].items()}
