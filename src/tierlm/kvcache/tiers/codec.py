"""The byte format of one lower-tier entry: a header that says what the KV is, then the payload.

    offset  size  field
    0       4     magic b"TLKV"
    4       2     format version (FORMAT_VERSION)
    6       2     reserved (0)
    8       4     header length H (bytes from offset 0 to the payload)
    12      8     payload length P
    20      8     checksum: xxh3_64 of bytes [28, H + P) (the rest of the header and the payload)
    28      ...   the rest of the header: JSON {"model": model id, "kv_format", "layout", "tokens": [ids]}
    H       P     payload: the block's parts (data, then scales and block metadata, in `layout` order),
                  each part's raw bytes for every layer, block-major as KVStorage.gather_blocks returns them

Decoding checks everything a reader could get wrong: a short buffer, a foreign magic or version, the
checksum (flipped bits, a truncated file), the model, the KV format, the storage layout (shapes and dtypes),
and the token ids against the ones the reader expects. Any mismatch raises CorruptEntry naming it; the
controller counts it, deletes the entry and recomputes: never a crash, never a wrong token.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

MAGIC = b"TLKV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHIQQ")  # magic, version, reserved, header length, payload length, checksum
_CHECKED_FROM = _FIXED.size  # the checksum covers everything after the fixed part


class CorruptEntry(ValueError):
    """A tier entry that cannot be used (corrupt, truncated, foreign). `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class EntryIdentity:
    """What every entry of one engine must carry: checked on decode, so entries of another model, KV format
    or storage layout (written under the same key by a misconfigured peer, or renamed by hand) are misses."""

    model: str
    kv_format: str
    layout: str  # "data:float32:30x2x16x3x64;..." from the storage's parts


def encode_entry(identity: EntryIdentity, token_ids: Sequence[int], payload: Sequence[memoryview | bytes]) -> bytes:
    """Header + payload pieces joined in one allocation (one copy of the payload)."""
    meta = json.dumps({"model": identity.model, "kv_format": identity.kv_format, "layout": identity.layout,
                       "tokens": list(token_ids)}, separators=(",", ":")).encode()
    payload_len = sum(memoryview(p).nbytes for p in payload)
    header_len = _FIXED.size + len(meta)
    h = xxhash.xxh3_64()
    h.update(meta)
    for p in payload:
        h.update(p)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, header_len, payload_len, h.intdigest())
    return b"".join([fixed, meta, *payload])


def decode_entry(buf: bytes | memoryview, identity: EntryIdentity, token_ids: Sequence[int]) -> memoryview:
    """The payload of a valid entry for `identity` holding exactly `token_ids`, as a view into `buf`."""
    view = memoryview(buf)
    if view.nbytes < _FIXED.size:
        raise CorruptEntry("truncated", f"{view.nbytes} bytes, shorter than the {_FIXED.size}-byte header")
    magic, version, _, header_len, payload_len, checksum = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptEntry("foreign", f"magic {magic!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntry("foreign", f"format version {version}, this reader knows {FORMAT_VERSION}")
    if view.nbytes != header_len + payload_len:
        raise CorruptEntry("truncated", f"{view.nbytes} bytes, header says {header_len + payload_len}")
    if xxhash.xxh3_64_intdigest(view[_CHECKED_FROM:]) != checksum:
        raise CorruptEntry("checksum", "xxh3_64 of the entry does not match its header")
    try:
        meta = json.loads(bytes(view[_FIXED.size:header_len]))
    except ValueError as e:  # checksum passed, so a writer bug: still only a miss
        raise CorruptEntry("foreign", f"header is not JSON: {e}") from None
    for field in ("model", "kv_format", "layout"):
        if meta.get(field) != getattr(identity, field):
            raise CorruptEntry("foreign", f"{field} {meta.get(field)!r}, expected {getattr(identity, field)!r}")
    if meta.get("tokens") != list(token_ids):
        raise CorruptEntry("foreign", "token ids differ from the block's (a hash collision or a foreign writer)")
    return view[header_len:]
