"""FP8 KV through every attention backend: K/V quantized on write (LayerKV.write_slots), read back in place
(cpu: the native FP8 decode kernel) or dequantized on gather (torch, and the cpu backend's prefill).

Two references per case, on scrambled block tables with decodes and prefill chunks over cached context:
  exact  dense fp32 attention over the values the cache actually holds (dequantized K/V), for the step's
         own new tokens too (write_kv hands attend the K/V as stored), so a lossy format gives the same
         output whether a token was just computed or read back. Same math up to fp32 rounding: tight tolerance.
  fp32   dense attention over the original fp32 K/V: the error the format costs, bounded loosely per type.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierlm.attention import BACKENDS, AttentionContext
from tierlm.core.registry import get_kv_format
from tierlm.kvcache import KVSpec, KVStorage
from tierlm.quant.fp8 import dequantize_kv_rows
from helpers.attention import dense_reference, paged_step

CPU = torch.device("cpu")
FORMATS = ["fp8_e4m3", "fp8_e4m3_ue8m0", "fp8_e5m2", "fp8_e4m3_g64", "fp8_e5m2_g64_ue8m0", "fp8_e4m3_static"]
# fp32-reference bound on max |out - ref| / max |ref| per FP8 type (random normal K/V, scales per token)
LOOSE = {"e4m3": 0.08, "e5m2": 0.2}  # max |fp8 - fp32| over max |fp32|, fp32 scales; UE8M0 rounds a scale up to
# a power of two, which can leave the top binade of the type unused: up to one mantissa bit lost, twice the bound


def _backends():
    return sorted(BACKENDS)


def _static(hkv):
    return torch.tensor([[0.011, 0.009, 0.013][:hkv], [0.010, 0.012, 0.008][:hkv]])


def run_fp8_case(backend, kv_format, decode_lens, prefills, hkv, g, seed, bs=4, d=None, nb=64):
    d = d or (128 if get_kv_format(kv_format).scale_group else 64)  # grouped formats: 2 groups per head
    torch.manual_seed(seed)
    spec = KVSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, kv_format=kv_format, block_size=bs)
    storage = KVStorage(spec, nb, CPU)
    layer = storage[0]
    if layer.static_scales is not None:
        layer.static_scales = _static(hkv)
    meta, seqs, tables, full_k, full_v, q_rows, new_k, new_v = paged_step(storage, decode_lens, prefills, g, nb)
    backend.prepare(meta, nb)
    q = torch.cat(q_rows)
    out = AttentionContext(meta, storage, backend).forward(0, q, new_k, new_v, scale=d ** -0.5)

    def held(table, L):
        """What the cache holds for a sequence's first L tokens, dequantized: [L, Hkv, D] K and V."""
        idx = torch.tensor(table)
        rows = torch.cat((idx, idx + nb))
        kv = layer.read_blocks(rows).view(2, -1, hkv, d)[:, :L]
        return kv[0], kv[1]

    exact, loose = [], []
    for i, (qr, k, v, (c, n), table) in enumerate(zip(q_rows, full_k, full_v, seqs, tables)):
        hk, hv = held(table, c + n)  # every backend attends to what the cache holds, fresh tokens included
        exact.append(dense_reference(qr, hk, hv, c, d ** -0.5))
        loose.append(dense_reference(qr, k, v, c, d ** -0.5))
    return out, torch.cat(exact), torch.cat(loose), layer


@pytest.fixture(params=_backends())
def backend(request):
    cls = BACKENDS[request.param]
    reason = cls.unsupported(CPU, torch.float32, "fp8_e4m3")
    if reason is not None:
        pytest.skip(f"backend {request.param} cannot run FP8 here: {reason}")
    return cls()


@pytest.mark.parametrize("kv_format", FORMATS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(decode_lens=st.lists(st.integers(1, 40), max_size=4),
       prefills=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 12)), max_size=2),
       hkv=st.sampled_from([1, 3]), g=st.sampled_from([1, 3]), seed=st.integers(0, 1000))
def test_fp8_matches_dense_over_what_the_cache_holds(backend, kv_format, decode_lens, prefills, hkv, g, seed):
    if not decode_lens and not prefills:
        return
    out, exact, loose, _ = run_fp8_case(backend, kv_format, decode_lens, prefills, hkv, g, seed)
    torch.testing.assert_close(out, exact, atol=2e-5, rtol=1e-4)
    if not get_kv_format(kv_format).static:  # static test scales are arbitrary, not calibrated to the data
        err = ((out - loose).abs().max() / loose.abs().max()).item()
        fmt = get_kv_format(kv_format)
        assert err < LOOSE[fmt.fp8] * (2 if fmt.scheme().scale_type == "ue8m0" else 1), err


def test_the_cache_holds_fp8_bytes_and_scales():
    """write_slots stores FP8 data and per-token scales; read_blocks gives back values within the type's
    precision; a static format stores no per-token scales."""
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_dim=128, kv_format="fp8_e4m3_g64_ue8m0", block_size=4)
    layer = KVStorage(spec, 8, CPU)[0]
    assert layer.data.dtype == torch.float8_e4m3fn and layer.scales.shape == (2, 8, 4, 2, 2)
    assert layer.scales.dtype == torch.uint8
    k, v = torch.randn(6, 2, 128), torch.randn(6, 2, 128) * 100
    slots = torch.tensor([4, 5, 6, 7, 12, 13])  # blocks 1 and 3
    layer.write_slots(slots, k, v)
    back = layer.read_blocks(torch.tensor([1, 3, 9, 11])).view(2, 8, 2, 128)[:, :6]
    assert back.dtype == torch.float32
    # e4m3: 3 mantissa bits, RNE: relative 2^-4 for normals; a value below 2^-6 of its group's scale range is
    # subnormal, off by up to half a step (2^-10 x scale)
    step = torch.exp2(layer.scales[:, [1, 3]].float() - 127).amax((1, 2, 3, 4)) * 2 ** -10  # [K, V]
    assert ((back[0] - k).abs() <= k.abs() * 2 ** -3 + step[0]).all()
    assert ((back[1] - v).abs() <= v.abs() * 2 ** -3 + step[1]).all()
    e = layer.scales[:, 1].int()
    assert ((e >= 1) & (e <= 254)).all()
    static = KVStorage(KVSpec(1, 2, 64, "fp8_e4m3_static", 4), 8, CPU)[0]
    assert static.scales is None and torch.isnan(static.static_scales).all()


def test_static_rows_use_the_k_or_v_scale_by_position_in_the_index():
    data = torch.full((4, 1, 2, 4), 1.0).to(torch.float8_e4m3fn)  # 4 rows: 2 K blocks then 2 V blocks
    from tierlm.quant.fp8 import Fp8Scheme

    out = dequantize_kv_rows(data, None, Fp8Scheme(static=True), torch.tensor([[2.0, 3.0], [5.0, 7.0]]),
                             torch.tensor([False, False, True, True]))
    assert out[0, 0, :, 0].tolist() == [2.0, 3.0] and out[3, 0, :, 0].tolist() == [5.0, 7.0]
