"""The Triton paged-decode kernel (kernels/triton_attention.py) against the torch backend, the reference: every
KV format, split-KV on and off, GQA, a sparse selector's compacted tables, and a grid that never depends on
lengths (what a captured decode step needs). On a machine without a GPU it runs under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); on the device (TIERLM_TEST_DEVICE=cuda) it runs compiled.
The backend also runs through the shared backend tests (test_paged_attention.py, test_fp8_attention.py)."""
from __future__ import annotations

import os

import pytest
import torch

from tierlm.attention import AttentionContext, TorchPagedBackend, TritonBackend
from tierlm.kvcache import KVSpec, KVStorage
from helpers.attention import paged_step

DEVICE = torch.device(os.environ.get("TIERLM_TEST_DEVICE", "cpu"))
pytestmark = pytest.mark.skipif(
    TritonBackend.unsupported(DEVICE, torch.float32, "fp32") is not None,
    reason=f"triton backend: {TritonBackend.unsupported(DEVICE, torch.float32, 'fp32')}")

FORMATS = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_ue8m0", "fp8_e4m3_g64", "fp8_e4m3_static"]


def _storage(kv_format, hkv, d, bs, nb):
    spec = KVSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, kv_format=kv_format, block_size=bs)
    storage = KVStorage(spec, nb, "cpu")
    layer = storage[0]
    if layer.static_scales is not None:
        layer.static_scales = torch.rand(2, hkv) * 0.02 + 0.005
    return storage


def _to(storage, device):
    for layer in storage.layers:
        layer.data = layer.data.to(device)
        if layer.scales is not None:
            layer.scales = layer.scales.to(device)
        if layer.static_scales is not None:
            layer.static_scales = layer.static_scales.to(device)
    return storage


def _decode_both(storage, meta, q, new_k, new_v, target, d):
    """The step's decode rows through the torch backend and through Triton (splits from `target`)."""
    outs = []
    for backend in (TorchPagedBackend(), TritonBackend(target_programs=target)):
        backend.prepare(meta, storage.num_ids)
        outs.append(AttentionContext(meta, storage, backend).forward(0, q, new_k, new_v, scale=d ** -0.5))
    return outs


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("target", [1, 64])  # one program per row and head; split until ~64 programs
def test_decode_matches_torch_backend(kv_format, target):
    torch.manual_seed(len(kv_format) * 7 + target)
    hkv, g, bs, nb = 2, 3, 4, 48
    d = 128 if kv_format.endswith("g64") else 32
    storage = _to(_storage(kv_format, hkv, d, bs, nb), DEVICE)
    meta, *_, q_rows, new_k, new_v = paged_step(storage, [1, 5, 17, 30], [], g, nb)
    meta = _meta_to(meta, DEVICE)
    q = torch.cat(q_rows).to(DEVICE)
    ref, out = _decode_both(storage, meta, q, new_k.to(DEVICE), new_v.to(DEVICE), target, d)
    tol = 2e-2 if kv_format in ("bf16", "fp16") else 2e-5
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _meta_to(meta, device):
    import dataclasses

    return dataclasses.replace(
        meta, slot_mapping=meta.slot_mapping.to(device),
        decode_block_tables=None if meta.decode_block_tables is None else meta.decode_block_tables.to(device),
        decode_seq_lens=None if meta.decode_seq_lens is None else meta.decode_seq_lens.to(device),
        prefill_block_tables=[t.to(device) for t in meta.prefill_block_tables])


def test_split_count_depends_on_shapes_only():
    from tierlm.kernels import triton_attention as tk

    # the same rows, heads and table width give the same grid whatever the lengths (a captured step replays it)
    assert tk.num_splits(2, 4, 64, 256, 4) == 16  # 256 programs / 8 -> 32 splits, capped at 64 / 4 blocks
    assert tk.num_splits(64, 8, 64, 256, 4) == 1  # enough programs already
    assert tk.num_splits(1, 1, 3, 256, 4) == 1  # a short table is not split below min_blocks


def test_empty_splits_and_mixed_lengths():
    """Splits finer than a short row's blocks leave empty splits (lse -inf); the merge must ignore them."""
    torch.manual_seed(3)
    hkv, g, d, bs, nb = 1, 4, 16, 2, 64
    storage = _to(_storage("fp32", hkv, d, bs, nb), DEVICE)
    meta, *_, q_rows, new_k, new_v = paged_step(storage, [1, 2, 40], [], g, nb)
    meta = _meta_to(meta, DEVICE)
    q = torch.cat(q_rows).to(DEVICE)
    ref, out = _decode_both(storage, meta, q, new_k.to(DEVICE), new_v.to(DEVICE), 1000, d)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_kernel_reads_the_tables_it_is_given():
    """A sparse selector's compacted tables: the kernel attends over exactly the blocks a row names (sink, picked
    blocks, window), the same as the torch backend on those tables; and not over the dense context."""
    from tierlm.attention import AttentionMetadata

    torch.manual_seed(5)
    hkv, g, d, bs, nb = 2, 2, 32, 4, 32
    storage = _to(_storage("fp8_e4m3", hkv, d, bs, nb), DEVICE)
    layer = storage[0]
    slots = torch.arange(nb * bs)
    layer.write_slots(slots.to(DEVICE), torch.randn(nb * bs, hkv, d, device=DEVICE),
                      torch.randn(nb * bs, hkv, d, device=DEVICE))
    dense = torch.tensor([[7, 3, 11, 20, 5, 9, 30, 2]], device=DEVICE)  # 8 blocks, last one partial
    picked = torch.tensor([[7, 20, 9, 2, 7, 7, 7, 7]], device=DEVICE)  # sink, 2 picks, window; padded
    q = torch.randn(1, hkv * g, d, device=DEVICE)
    outs = {}
    for name, tables, lens in (("dense", dense, torch.tensor([30], device=DEVICE)),
                               ("picked", picked, torch.tensor([14], device=DEVICE))):
        meta = AttentionMetadata(block_size=bs, slot_mapping=torch.zeros(0, dtype=torch.long, device=DEVICE),
                                 num_decodes=1, decode_block_tables=tables, decode_seq_lens=lens)
        for backend in (TorchPagedBackend(), TritonBackend(target_programs=8)):
            backend.prepare(meta, nb)
            outs[name, backend.name] = backend.decode(q, layer, meta, d ** -0.5)
    for name in ("dense", "picked"):
        torch.testing.assert_close(outs[name, "triton"], outs[name, "torch"], atol=2e-5, rtol=2e-5)
    assert (outs["picked", "triton"] - outs["dense", "triton"]).abs().max() > 1e-2


def test_selection_by_name_only():
    from tierlm.attention import select_backend

    # "auto" keeps the torch backend (or cpu) until the Triton one is measured on the device
    assert select_backend("auto", torch.device("cpu"), torch.bfloat16, "bf16").name == "torch"
    assert select_backend("triton", torch.device("cpu"), torch.float32, "fp8_e4m3").name == "triton"
