"""KVStorage: allocation from the spec, and the batched block verbs the tiers will use."""
from __future__ import annotations

import pytest
import torch

from tierlm.kvcache import KVSpec, KVStorage

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, kv_format="fp32", block_size=4)


def filled(num_blocks=10, seed=0) -> KVStorage:
    s = KVStorage(SPEC, num_blocks, "cpu")
    g = torch.Generator().manual_seed(seed)
    for layer in s.layers:
        layer.data.copy_(torch.randn(layer.data.shape, generator=g))
    return s


def test_allocation_matches_the_spec_arithmetic():
    s = KVStorage(SPEC, 7, "cpu")
    assert len(s) == 3 and s[0].data.shape == (2, 7, 4, 2, 8)
    assert s.nbytes == 7 * SPEC.page_size_bytes
    assert all(not layer.data.any() for layer in s.layers)  # zero-filled


def test_gather_is_block_major_and_scatter_round_trips():
    src = filled()
    ids = [7, 2, 9]
    parts = src.gather_blocks(ids)
    assert set(parts) == {"data"} and parts["data"].shape == (3, 3, 2, 4, 2, 8)  # [n, L, 2, bs, Hkv, D]
    for i, b in enumerate(ids):
        for layer in range(3):
            assert torch.equal(parts["data"][i, layer], src[layer].data[:, b])
    dst = KVStorage(SPEC, 10, "cpu")
    dst.scatter_blocks([0, 5, 1], parts)
    for (a, b) in ((7, 0), (2, 5), (9, 1)):
        for layer in range(3):
            assert torch.equal(dst[layer].data[:, b], src[layer].data[:, a])
    untouched = [b for b in range(10) if b not in (0, 5, 1)]
    assert not dst[0].data[:, untouched].any()


def test_copy_blocks_and_block_meta_move_together():
    s = filled()
    s.add_block_meta("key_max", (2, 8), torch.float32)
    for layer in s.layers:
        layer.block_meta["key_max"].copy_(torch.arange(10.0)[:, None, None].expand(10, 2, 8))
    before = [layer.data[:, 3].clone() for layer in s.layers]
    s.copy_blocks([3, 4], [8, 9])
    for layer, b in zip(s.layers, before):
        assert torch.equal(layer.data[:, 8], b)
        assert float(layer.block_meta["key_max"][8, 0, 0]) == 3.0 and float(layer.block_meta["key_max"][9, 1, 7]) == 4.0
    parts = s.gather_blocks([9])
    assert set(parts) == {"data", "meta.key_max"} and float(parts["meta.key_max"][0, 2, 0, 0]) == 4.0
    assert s.nbytes == 10 * SPEC.page_size_bytes + 3 * 10 * 2 * 8 * 4


def test_fp8_bytes_move_through_the_verbs():
    s = KVStorage(SPEC, 4, "cpu")
    for layer in s.layers:  # an FP8 layer, as the FP8 KV formats will allocate it
        layer.data = torch.randn(layer.data.shape).to(torch.float8_e4m3fn)
    parts = s.gather_blocks([1, 2])
    s.scatter_blocks([3, 0], parts)
    assert torch.equal(s[1].data[:, 3].view(torch.uint8), s[1].data[:, 1].view(torch.uint8))


def test_bad_ids_and_parts_are_refused():
    s = filled()
    with pytest.raises(IndexError, match="out of range"):
        s.gather_blocks([10])
    with pytest.raises(ValueError, match="do not match"):
        s.scatter_blocks([0], {"scales": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="expected"):
        s.scatter_blocks([0, 1], s.gather_blocks([2]))
    with pytest.raises(ValueError):
        s.copy_blocks([1, 2], [3])
