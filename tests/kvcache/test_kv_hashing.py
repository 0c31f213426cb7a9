"""Block hashes: stable bytes (golden digests), chained, sensitive to seed, parent, tokens and extra keys."""
import hashlib
import struct

import pytest

from tierlm.kvcache.hashing import hash_block_tokens, hash_request_blocks, root_hash

KEYS = ("smollm2-135m", "bf16", "")

# Recorded once. If these change, every persisted tier (disk, Redis) written before is silently
# invalidated: change them only together with a deliberate format bump.
GOLDEN_ROOT_0 = "63ec9c99ed8e0fd7d81e49b07d28cbb4a8b81fb17f32b8ffdbca2b315271a1ee"
GOLDEN_BLOCK = "8c8755d568224e2f338ab2429441a94ad867513cdca859ed1e8013c409b07969"


def test_golden_digests():
    assert root_hash(0).hex() == GOLDEN_ROOT_0
    assert hash_block_tokens(root_hash(0), list(range(16)), KEYS).hex() == GOLDEN_BLOCK


def test_encoding_spelled_out():
    """The canonical encoding, written independently of the implementation."""
    def s(x: str) -> bytes:
        return b"S" + struct.pack("<I", len(x)) + x.encode()

    root = hashlib.sha256(b"tierlm-kv-root\x00" + b"I" + struct.pack("<I", 1) + b"0").digest()
    block = hashlib.sha256(
        b"tierlm-kv-block\x00" + root + struct.pack("<I16q", 16, *range(16))
        + b"(" + struct.pack("<I", 3) + s("smollm2-135m") + s("bf16") + s("")
    ).digest()
    assert block.hex() == GOLDEN_BLOCK


def test_none_parent_is_the_seed_zero_root():
    assert hash_block_tokens(None, [1, 2, 3], KEYS) == hash_block_tokens(root_hash(0), [1, 2, 3], KEYS)


def test_every_input_changes_the_hash():
    base = hash_block_tokens(root_hash(0), [1, 2, 3, 4], KEYS)
    variants = [
        hash_block_tokens(root_hash(1), [1, 2, 3, 4], KEYS),  # seed
        hash_block_tokens(base, [1, 2, 3, 4], KEYS),  # parent
        hash_block_tokens(root_hash(0), [1, 2, 4, 3], KEYS),  # token order
        hash_block_tokens(root_hash(0), [1, 2, 3, 4 + 2**32], KEYS),  # high bits of a token
        hash_block_tokens(root_hash(0), [1, 2, 3, 4], ("smollm2-135m", "fp32", "")),  # KV format
        hash_block_tokens(root_hash(0), [1, 2, 3, 4], ("smollm2-135m", "bf16", "tenant-a")),  # salt
        hash_block_tokens(root_hash(0), [1, 2, 3, 4], ()),
    ]
    assert len({base, *variants}) == 1 + len(variants)


@pytest.mark.parametrize(
    ("a", "b"),
    [(("ab", "c"), ("a", "bc")), ((1,), ("1",)), ((True,), (1,)), ((b"x",), ("x",)), (((1, 2),), (1, 2)), ((None,), ())],
)
def test_extra_key_encoding_is_injective(a, b):
    assert hash_block_tokens(None, [7], a) != hash_block_tokens(None, [7], b)


def test_unencodable_extra_key_is_refused():
    with pytest.raises(TypeError, match="stable encoding"):
        hash_block_tokens(None, [7], ({"a": 1},))


def test_request_blocks_chain_and_skip_the_partial_block():
    tokens = list(range(10))
    h = hash_request_blocks(tokens, 4, seed=3, extra_keys=KEYS)
    h0 = hash_block_tokens(root_hash(3), [0, 1, 2, 3], KEYS)
    h1 = hash_block_tokens(h0, [4, 5, 6, 7], KEYS)
    assert h == [h0, h1]
    assert hash_request_blocks(tokens[:3], 4, seed=3, extra_keys=KEYS) == []


def test_continuing_a_chain_equals_hashing_at_once():
    tokens = list(range(100, 124))
    whole = hash_request_blocks(tokens, 8, seed=5, extra_keys=KEYS)
    head = hash_request_blocks(tokens[:8], 8, seed=5, extra_keys=KEYS)
    rest = hash_request_blocks(tokens[8:], 8, seed=5, extra_keys=KEYS, start_parent=head[-1])
    assert head + rest == whole
