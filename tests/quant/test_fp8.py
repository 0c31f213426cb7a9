"""FP8 numbers and scale rules (tierlm.quant.fp8): round-trip error bounds per type and granularity, UE8M0
scales are powers of two that never let a value overflow, static scales, bad schemes refused."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierlm.core.errors import InvalidParameterError
from tierlm.quant.fp8 import (FP8_TYPES, Fp8Scheme, compute_scales, decode_scales, dequantize, quantize, quantize_kv,
                              ue8m0_decode, ue8m0_encode, widen_table)

# Relative round-to-nearest error of a value within the type's normal range: half an ulp = 2^-(mantissa+1).
HALF_ULP = {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}


@settings(max_examples=60, deadline=None)
@given(fp8=st.sampled_from(["e4m3", "e5m2"]), group=st.sampled_from([None, 16, 32, 64]),
       scale_type=st.sampled_from(["fp32", "ue8m0"]), magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       seed=st.integers(0, 10_000))
def test_round_trip_error_is_bounded_by_the_type(fp8, group, scale_type, magnitude, seed):
    """Every value comes back within half an ulp of its type relative to itself (normal range), or within the
    smallest step of its group's scale (the subnormal range near zero); nothing overflows to inf/NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, 64, generator=g) * magnitude
    scheme = Fp8Scheme(fp8, group, scale_type)
    data, scales = quantize(x, scheme)
    assert data.dtype == FP8_TYPES[fp8].dtype and data.shape == x.shape
    assert scales.shape == (7, 3, 1 if group is None else 64 // group)
    back = dequantize(data, scales, scheme)
    assert torch.isfinite(back).all()
    s = decode_scales(scales, scheme).repeat_interleave(64 // scales.shape[-1], dim=-1)
    tiny = {"e4m3": 2.0 ** -9, "e5m2": 2.0 ** -16}[fp8] * s  # the type's smallest subnormal, scaled
    assert ((back - x).abs() <= x.abs() * HALF_ULP[fp8] + tiny).all()


def test_the_group_maximum_lands_on_the_type_maximum_with_fp32_scales():
    x = torch.tensor([[[0.5, -3.0, 1.0, 2.0]]])
    data, scales = quantize(x, Fp8Scheme("e4m3"))
    assert scales.item() == pytest.approx(3.0 / 448)
    assert data.float()[0, 0, 1].item() == -448.0


@given(st.floats(1e-30, 1e30))
def test_ue8m0_is_the_next_power_of_two_up(scale):
    e = ue8m0_encode(torch.tensor([scale], dtype=torch.float32))
    v = ue8m0_decode(e).item()
    s32 = torch.tensor(scale, dtype=torch.float32).item()
    m, _ = torch.frexp(torch.tensor(v))
    assert m.item() == 0.5  # a power of two
    assert s32 <= v < 2 * s32 or v == 2.0 ** -126


def test_ue8m0_scales_never_overflow_the_type():
    x = torch.tensor([[[447.9, 448.0, 449.0, 1000.0]]]).expand(1, 1, 4) * torch.tensor([1.0, 0.5, 0.25, 3.3])
    for fp8 in ("e4m3", "e5m2"):
        scheme = Fp8Scheme(fp8, scale_type="ue8m0")
        data, scales = quantize(x, scheme)
        assert (data.float().abs() <= FP8_TYPES[fp8].max).all()
        assert decode_scales(scales, scheme).item() >= x.abs().max().item() / FP8_TYPES[fp8].max


def test_zero_groups_quantize_to_zero():
    x = torch.zeros(2, 1, 64)
    for st_ in ("fp32", "ue8m0"):
        data, scales = quantize(x, Fp8Scheme(scale_type=st_))
        assert (dequantize(data, scales, Fp8Scheme(scale_type=st_)) == 0).all()
        assert torch.isfinite(decode_scales(scales, Fp8Scheme(scale_type=st_))).all()


def test_static_scales_divide_by_the_calibrated_value_and_saturate():
    kv = torch.tensor([1.0, 2.0, 1e6]).view(1, 3, 1, 1).expand(2, 3, 2, 4).clone()  # [2, T, H, D]
    static = torch.tensor([[1 / 448, 1.0], [2 / 448, 1.0]])  # K head 0: 1.0 -> 448
    data, scales = quantize_kv(kv, Fp8Scheme(static=True), static)
    assert scales is None
    f = data.view(torch.float8_e4m3fn).float()
    assert f[0, 0, 0, 0].item() == 448.0 and f[1, 0, 0, 0].item() == 224.0
    assert f[0, 2, 0, 0].item() == 448.0  # beyond the calibrated range: saturates, never NaN
    with pytest.raises(ValueError, match="calibrated scales"):
        quantize_kv(kv, Fp8Scheme(static=True), None)


def test_widen_table_matches_torch_for_every_byte():
    for fp8, t in FP8_TYPES.items():
        table = widen_table(fp8)
        b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        assert torch.equal(table.isnan(), b.view(t.dtype).float().isnan())
        assert table[~table.isnan()].tolist() == b.view(t.dtype).float()[~table.isnan()].tolist()


@pytest.mark.parametrize("kwargs,match", [
    (dict(fp8="e3m4"), "unknown FP8 type"),
    (dict(scale_type="int8"), "unknown scale type"),
    (dict(group=0), "scale group 0"),
    (dict(static=True, group=64), "static KV scales"),
])
def test_bad_schemes_are_refused(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        Fp8Scheme(**kwargs)


def test_a_group_must_divide_head_dim():
    with pytest.raises(InvalidParameterError, match="does not divide head_dim 96"):
        compute_scales(torch.zeros(1, 1, 96), Fp8Scheme(group=64))
