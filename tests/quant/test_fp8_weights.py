"""FP8 e4m3 weights with 128 x 128 block scales (quant.weights fp8 / fp8_ue8m0): the quantizer follows DeepSeek-V3's
rule, the packed layout round-trips, and the native kernels (matmul, W^T and row dequantization) match the PyTorch
definition on a grid of shapes with poisoned padding; torch._scaled_mm's route matches its own definition."""
from __future__ import annotations

import pytest
import torch

from tierlm.core.errors import InvalidParameterError
from tierlm.kernels import quant as kq
from tierlm.quant.weights import (FP8_BLOCK, PackedWeight, codes_of, concat_rows, dequantize, fp8_block_scales, pack,
                                  permute_rows, quantize, quantize_fp8, row_params)

native = pytest.mark.skipif(not kq.qmatmul_usable(), reason="native kernels unavailable (no C compiler)")
# (N, K): N not a multiple of the 16-row tile or crossing a 128-row block; K with a short last 128-input block
SHAPES = [(49, 3 * 32), (33, 160), (17, 576), (130, 256), (16, 128)]
MS = (1, 2, 5, 16, 64)


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # blocks of very different magnitudes, so a scale applied to the wrong block shows
    return torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-8, 4, (n, 1), generator=g).float()) \
        * torch.exp2(torch.randint(-3, 3, (1, k), generator=g).float())


@pytest.mark.parametrize("fmt", ["fp8", "fp8_ue8m0"])
def test_block_scales_and_codes_follow_deepseek(fmt):
    w = _weights(200, 320, 1)
    pw = quantize(w, fmt)
    s = fp8_block_scales(w, fmt == "fp8_ue8m0")
    assert s.shape == (2, 3)  # ceil(200 / 128) x ceil(320 / 128): the edge blocks are smaller
    for bi in range(2):
        for bj in range(3):
            amax = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].abs().max()
            if fmt == "fp8":
                assert s[bi, bj] == amax / 448
            else:  # the smallest power of two with amax / s <= 448
                e = torch.log2(s[bi, bj])
                assert e == e.round() and amax / s[bi, bj] <= 448 < 2 * amax / s[bi, bj]
    full = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :320]
    want_codes = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(codes_of(pw), want_codes.view(torch.uint8))
    assert torch.equal(dequantize(pw), want_codes.float() * full)
    assert not torch.isin(codes_of(pw), torch.tensor([0x7F, 0xFF], dtype=torch.uint8)).any(), "no NaN codes"
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 (1/2 ulp), or half the subnormal step near zero
    err = (dequantize(pw) - w).abs()
    assert (err <= torch.maximum(w.abs() * 2 ** -4, full * 2 ** -10)).all()


def test_given_scales_are_used_as_they_are():
    """A checkpoint's block scales (weight_scale_inv) are kept, not recomputed."""
    w = _weights(64, 256, 2)
    scales = fp8_block_scales(w, False) * 2  # a coarser scale than the rule's
    pw = quantize_fp8(w, "fp8", scales=scales)
    sc, mins = row_params(pw)
    assert mins is None and torch.equal(sc, scales.repeat_interleave(128, 0)[:64])


def test_pack_round_trips_permutes_and_fuses_exactly():
    codes = torch.randint(0, 0x7F, (21, 160), dtype=torch.uint8)
    scales = torch.rand(21, 2) + 0.5
    pw = pack("fp8", codes, scales, None, 8)
    assert pw.data.shape == (2, 160 * 16) and pw.scales.shape == (2, 2, 16) and pw.mins.numel() == 0
    assert torch.equal(codes_of(pw), codes) and torch.equal(row_params(pw)[0], scales)
    assert (pw.scales[1, :, 5:] == 0).all() and (pw.data.view(2, 160, 16)[1, :, 5:] == 0).all(), "padding rows"
    a, b = quantize(_weights(20, 160, 3), "fp8"), quantize(_weights(12, 160, 4) * 100, "fp8")
    order = torch.randperm(20)
    assert torch.equal(dequantize(permute_rows(a, order)), dequantize(a)[order])
    fused = concat_rows([a, b])  # each part keeps its own block scales
    assert torch.equal(dequantize(fused), torch.cat([dequantize(a), dequantize(b)]))
    with pytest.raises(ValueError):
        concat_rows([a, quantize(torch.randn(12, 160), "fp8_ue8m0")])
    restored = PackedWeight.from_tensors("fp8", a.tensors("w"), "w")
    assert torch.equal(dequantize(restored), dequantize(a))
    with pytest.raises(ValueError, match="inconsistent"):
        PackedWeight("fp8", 8, FP8_BLOCK, 20, 160, a.data, a.scales.half(), a.mins).check()


def test_shapes_fp8_cannot_take_name_the_fix():
    with pytest.raises(InvalidParameterError, match="100 inputs, not a multiple of 32.*fp8"):
        quantize(torch.randn(4, 100), "fp8", what="w")


def _poisoned(pw: PackedWeight) -> PackedWeight:
    def pad(t: torch.Tensor, poison) -> torch.Tensor:
        buf = torch.full((2 * t.numel() + 64,), poison, dtype=t.dtype)
        buf[: t.numel()] = t.reshape(-1)
        return buf[: t.numel()].view(t.shape)
    return PackedWeight(pw.fmt, pw.bits, pw.group, pw.n, pw.k, pad(pw.data, 0x7F), pad(pw.scales, float("nan")),
                        pw.mins)


def _run(x: torch.Tensor, pw: PackedWeight, bias, portable: bool) -> torch.Tensor:
    """The kernel with x of row stride K + 8 (NaN beyond K) and y inside a NaN buffer of row stride N + 5."""
    m, k = x.shape
    xbuf = torch.full((m + 1, k + 8), float("nan"))
    xbuf[:m, :k] = x
    ybuf = torch.full((m + 1, pw.n + 5), float("nan"))
    assert kq._lib().tierlm_fp8_matmul(xbuf.data_ptr(), k + 8, pw.data.data_ptr(), pw.scales.data_ptr(),
                                       None if bias is None else bias.data_ptr(), ybuf.data_ptr(), pw.n + 5, m, pw.n,
                                       k, int(portable)) == 0
    assert torch.isnan(ybuf[:m, pw.n:]).all() and torch.isnan(ybuf[m]).all(), "the kernel wrote past its output"
    return ybuf[:m, : pw.n].clone()


@native
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_matches_its_definition(n, k):
    """Codes widened through fp16 (e4m3 * 2^-8, exact) times fp32 activations: the dequantized weight's product up
    to summation order; the vector and portable paths agree bit for bit. Codes past the weight are e4m3 NaN and
    scales past it NaN, so an over-read shows."""
    g = torch.Generator().manual_seed(n * k)
    pw = _poisoned(quantize(_weights(n, k, n + k), "fp8"))
    bias = torch.randn(n, generator=g)
    w = dequantize(pw)
    for m in MS:
        x = torch.randn(m, k, generator=g) * 3
        vec, port = _run(x, pw, bias, False), _run(x, pw, bias, True)
        assert torch.isfinite(vec).all()
        assert torch.equal(vec, port), "the vector and portable paths must agree bit for bit"
        want = torch.nn.functional.linear(x.double(), w.double(), bias.double()).float()
        scale = (x.abs() @ w.abs().T).max().item()
        torch.testing.assert_close(vec, want, rtol=1e-5, atol=1e-6 * scale)
    for m in (1, 3):  # through the module-facing entry points too
        x = torch.randn(m, k, generator=g)
        torch.testing.assert_close(kq.qmatmul(x, pw, bias, activations="int8"), kq.reference_qmatmul(x, pw, bias),
                                   rtol=1e-5, atol=1e-5 * (x.abs() @ w.abs().T).max().item())


@native
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantization_is_exact_and_stays_inside_its_output(n, k):
    pw = _poisoned(quantize(_weights(n, k, 7 * n + k), "fp8_ue8m0"))
    want = dequantize(pw)
    lib = kq._lib()
    for portable in (False, True):
        buf = torch.full((k * n + 64,), float("nan"))
        assert lib.tierlm_fp8_dequant_t(pw.data.data_ptr(), pw.scales.data_ptr(), buf.data_ptr(), n, k,
                                        int(portable)) == 0
        assert torch.equal(buf[: k * n].view(k, n), want.T)
        assert torch.isnan(buf[k * n:]).all()
    rows = torch.tensor([0, n - 1, n // 2, min(16, n - 1)])
    assert torch.equal(kq.dequantize_rows(pw, rows), want[rows])
    with pytest.raises(IndexError):
        kq.dequantize_rows(pw, torch.tensor([n]))
    x = torch.randn(kq.GEMM_ROWS + 3, k)
    torch.testing.assert_close(kq.dequant_gemm(x, pw), x @ want.T, rtol=1e-5, atol=1e-4)


@native
def test_the_module_takes_fp32_activations_and_survives_a_dtype_cast():
    """An FP8 QuantLinear computes with fp32 activations whatever its mode says; model.to(dtype) must not convert
    its fp32 scales (kept as int32 bit patterns); the decode fast path, the GEMM route and the fused MLP agree."""
    from tierlm.models.linear import QuantLinear, quant_mlp

    w = _weights(96, 160, 9)
    pw = quantize(w, "fp8")
    lin = QuantLinear(pw, activations="int8")
    lin.to(torch.float16)
    assert lin.qscales.dtype == torch.int32 and torch.equal(lin.pw.scales, pw.scales)
    x = torch.randn(4, 160)
    want = torch.nn.functional.linear(x, dequantize(pw))
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-4)
    xl = torch.randn(kq.GEMM_ROWS, 160)
    torch.testing.assert_close(lin(xl), torch.nn.functional.linear(xl, dequantize(pw)), rtol=1e-5, atol=1e-4)
    gate_up, down = QuantLinear(quantize(_weights(2 * 64, 160, 10), "fp8")), QuantLinear(quantize(_weights(160, 64, 11), "fp8"))
    gate, up = gate_up(x).split(64, dim=-1)
    torch.testing.assert_close(quant_mlp(gate_up, down, x), down(torch.nn.functional.silu(gate) * up),
                               rtol=1e-4, atol=1e-4)


def test_scaled_mm_route_matches_its_definition():
    """The GPU route (torch._scaled_mm per 128-input block with row-wise scales, activations rounded to e4m3 per
    row and 128 inputs), run on the CPU build of _scaled_mm: equal to its definition, and within e4m3 rounding of
    fp32 activations."""
    w = _weights(48, 160, 12)
    pw = quantize(w, "fp8")
    x, bias = torch.randn(5, 160), torch.randn(48)
    got = kq.fp8_scaled_mm(x, kq.fp8_weight_blocks(pw), bias)
    want = kq.reference_fp8_scaled_mm(x, pw, bias)
    scale = (x.abs() @ dequantize(pw).abs().T).max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)
    exact = torch.nn.functional.linear(x, dequantize(pw), bias)
    err = (got - exact).abs().max().item()
    assert 0 < err < 2 ** -4 * scale  # activations rounded to 3 mantissa bits: lossy, but bounded
