"""Chained, seeded block hashes that are stable across processes, machines and restarts.

A full block's hash covers everything its KV depends on: every earlier token (through the parent
hash), its own token ids, and the extra keys (model id, KV format, tenant salt, ...):

    root = H("tierlm-kv-root", seed)
    h0   = H(root, tokens[0:B],  extra_keys)
    h1   = H(h0,   tokens[B:2B], extra_keys)      B = block_size; only full blocks are hashed

H is SHA-256 over a canonical byte encoding (no Python `hash()`, no pickle), so a lower tier written
by one process can be read by another. A hash match alone never reuses KV: the pool also compares
the stored token ids (see `BlockPool.lookup`).
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

_ROOT_DOMAIN = b"tierlm-kv-root\x00"
_BLOCK_DOMAIN = b"tierlm-kv-block\x00"


def root_hash(seed: int) -> BlockHash:
    """The parent of a sequence's first block. Changing the seed invalidates every cached block."""
    return BlockHash(hashlib.sha256(_ROOT_DOMAIN + _encode_key(int(seed))).digest())


def hash_block_tokens(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()
) -> BlockHash:
    """Hash of one block given its parent's hash (None: `root_hash(0)`).

    token_ids are encoded as little-endian int64; extra_keys may nest tuples of str, bytes, int,
    bool, float and None (anything else raises TypeError: it would have no stable encoding).
    """
    if parent is None:
        parent = root_hash(0)
    h = hashlib.sha256(_BLOCK_DOMAIN)
    h.update(parent)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(_encode_key(tuple(extra_keys)))
    return BlockHash(h.digest())


def hash_request_blocks(
    token_ids: Sequence[int],
    block_size: int,
    seed: int = 0,
    extra_keys: tuple = (),
    start_parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids` (a trailing partial block is skipped).

    `start_parent` is the hash of the block just before token_ids[0] when continuing a chain;
    None starts a sequence from `root_hash(seed)`.
    """
    parent = root_hash(seed) if start_parent is None else start_parent
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent)
    return hashes


def _encode_key(key: object) -> bytes:
    """Type-tagged, length-prefixed, injective byte encoding of an extra key."""
    if key is None:
        return b"N"
    if isinstance(key, bool):  # before int: bool is an int subclass
        return b"T" if key else b"F"
    if isinstance(key, int):
        digits = str(key).encode("ascii")
        return b"I" + struct.pack("<I", len(digits)) + digits
    if isinstance(key, float):
        return b"D" + struct.pack("<d", key)
    if isinstance(key, str):
        data = key.encode("utf-8")
        return b"S" + struct.pack("<I", len(data)) + data
    if isinstance(key, bytes):
        return b"Y" + struct.pack("<I", len(key)) + key
    if isinstance(key, tuple):
        return b"(" + struct.pack("<I", len(key)) + b"".join(_encode_key(k) for k in key)
    raise TypeError(f"extra key {key!r} of type {type(key).__name__} has no stable encoding")
