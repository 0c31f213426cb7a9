"""The weight-quantized matmul (kernels/quant.c) against its PyTorch definitions, on a grid of shapes.

Both activation modes, both code widths, groups from 32 to the whole row, N not a multiple of the 16-row
tile, K an odd multiple of the group, M = 1, 2, 7, 16, 64 (the 4- and 8-row chunks and their remainders).
The inputs sit inside larger buffers whose padding is NaN (x, scales, offsets) or 0xFF (codes), so a read
past the end shows up in the output; the output sits inside a NaN-filled buffer, so a write past it does too.
"""
from __future__ import annotations

import pytest
import torch

from tierlm.kernels import quant as kq
from tierlm.quant.weights import PackedWeight, dequantize, quantize

pytestmark = pytest.mark.skipif(not kq.qmatmul_usable(), reason="native kernels unavailable (no C compiler)")

# (format, group, N, K): K an odd multiple of the group; N not a multiple of 16
SHAPES = [("q4_1", None, 49, 3 * 32), ("q4_0", None, 33, 5 * 32), ("q8_0", None, 17, 3 * 32),
          ("int8", None, 40, 7 * 32), ("int4", 64, 23, 3 * 64), ("int4", 128, 16, 1 * 128), ("int4", 32, 81, 9 * 32)]
MS = (1, 2, 7, 16, 64)


def _padded(pw: PackedWeight) -> PackedWeight:
    """The same weight with every tensor a view into a buffer twice its size, padded with poison."""
    def pad(t: torch.Tensor, poison) -> torch.Tensor:
        buf = torch.full((2 * t.numel(),), poison, dtype=t.dtype)
        buf[: t.numel()] = t.reshape(-1)
        return buf[: t.numel()].view(t.shape)
    return PackedWeight(pw.fmt, pw.bits, pw.group, pw.n, pw.k, pad(pw.data, 0xFF), pad(pw.scales, float("nan")),
                        pad(pw.mins, float("nan")))


def _run(x: torch.Tensor, pw: PackedWeight, bias, portable: bool, activations: str) -> torch.Tensor:
    """Call the kernel with x of row stride K + 8 (NaN beyond K) and y inside a NaN buffer of row stride N + 5."""
    m, k = x.shape
    xbuf = torch.full((m + 1, k + 8), float("nan"))
    xbuf[:m, :k] = x
    ybuf = torch.full((m + 1, pw.n + 5), float("nan"))
    lib = kq._lib()
    args = (xbuf.data_ptr(), k + 8, pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(),
            None if bias is None else bias.data_ptr(), ybuf.data_ptr(), pw.n + 5, m, pw.n, k, pw.group, pw.bits)
    if activations == "fp32":
        rc = lib.tierlm_qmatmul_f32(*args, int(portable))
    else:
        rc = lib.tierlm_qmatmul(*args, 16 if activations == "int16" else 8, int(portable))
    assert rc == 0
    assert torch.isnan(ybuf[:m, pw.n:]).all() and torch.isnan(ybuf[m]).all(), "the kernel wrote past its output"
    return ybuf[:m, : pw.n].clone()


@pytest.mark.parametrize("fmt,group,n,k", SHAPES)
@pytest.mark.parametrize("activations", ["int16", "int8", "fp32"])
def test_kernel_matches_its_definition(fmt, group, n, k, activations):
    g = torch.Generator().manual_seed(n * k)
    pw = _padded(quantize(torch.randn(n, k, generator=g), fmt, group))
    bias = torch.randn(n, generator=g)
    for m in MS:
        x = torch.randn(m, k, generator=g) * 3
        vec = _run(x, pw, bias, False, activations)
        port = _run(x, pw, bias, True, activations)
        assert torch.isfinite(vec).all()
        assert torch.equal(vec, port), "the vector and portable paths must agree bit for bit"
        want = kq.reference_qmatmul(x, pw, bias, activations)
        torch.testing.assert_close(vec, want, rtol=1e-4, atol=1e-4 * k ** 0.5)


@pytest.mark.parametrize("fmt", ["q4_1", "int4"])
def test_integer_activations_stay_close_to_fp32(fmt):
    """The integer modes differ from fp32 activations only by rounding x per 32 values: int8's error is far below
    a 4-bit weight's own quantization error, and int16's about 256 times smaller again."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g)
    pw = quantize(w, fmt)
    x = torch.randn(8, 256, generator=g)
    exact = kq.dequant_matmul(x, pw)
    err8 = (kq.qmatmul(x, pw, activations="int8") - exact).abs().mean()
    err16 = (kq.qmatmul(x, pw, activations="int16") - exact).abs().mean()
    err_w = (torch.nn.functional.linear(x, w) - exact).abs().mean()
    assert err8 < 0.25 * err_w
    assert 0 < err16 < err8 / 64


def test_zero_rows_and_blocks():
    """All-zero activation blocks (scale 0) and all-zero weight groups give exact zeros, not NaN."""
    w = torch.randn(32, 96)
    w[:, 32:64] = 0
    w[5] = 0
    pw = quantize(w, "q8_0")
    x = torch.randn(3, 96)
    x[1] = 0
    x[2, :32] = 0
    for act in kq.ACTIVATIONS:
        y = kq.qmatmul(x, pw, activations=act)
        assert torch.isfinite(y).all()
        assert (y[1] == 0).all() and (y[:, 5] == 0).all()
        torch.testing.assert_close(y, kq.reference_qmatmul(x, pw, activations=act), rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_refused():
    pw = quantize(torch.randn(16, 64), "q4_1")
    with pytest.raises(ValueError, match="fp32 x"):
        kq.qmatmul(torch.randn(2, 32), pw)
    lib = kq._lib()
    x, y = torch.randn(1, 64), torch.empty(1, 16)
    # a group that is not a multiple of 32, or does not divide K: rc -1, nothing computed
    assert lib.tierlm_qmatmul(x.data_ptr(), 64, pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(), None,
                              y.data_ptr(), 16, 1, 16, 64, 48, 4, 16, 0) == -1
    assert lib.tierlm_qmatmul(x.data_ptr(), 64, pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(), None,
                              y.data_ptr(), 16, 1, 16, 64, 32, 4, 12, 0) == -1  # activations of 12 bits
    assert lib.tierlm_qmatmul_f32(x.data_ptr(), 64, pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(),
                                  None, y.data_ptr(), 16, 1, 16, 64, 32, 5, 0) == -1


def test_dequantized_rows_match_the_whole_table():
    pw = quantize(torch.randn(37, 64), "q4_1")
    rows = torch.tensor([0, 36, 17, 16, 15, 17])
    assert torch.equal(dequantize(pw, rows=rows), dequantize(pw)[rows])


@pytest.mark.parametrize("fmt,group,n,k", SHAPES)
def test_transposed_dequantization_and_the_gemm_route(fmt, group, n, k):
    """tierlm_qdequant_t (both paths) writes W^T exactly as the PyTorch dequantization, and stays inside its
    output; dequant_gemm equals fp32 activations times that weight (the route prefill takes)."""
    g = torch.Generator().manual_seed(n + k)
    pw = _padded(quantize(torch.randn(n, k, generator=g), fmt, group))
    want = dequantize(pw).T.contiguous()
    lib = kq._lib()
    for portable in (False, True):
        buf = torch.full((k * n + 64,), float("nan"))
        assert lib.tierlm_qdequant_t(pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(), buf.data_ptr(),
                                     n, k, pw.group, pw.bits, int(portable)) == 0
        assert torch.equal(buf[: k * n].view(k, n), want)
        assert torch.isnan(buf[k * n:]).all()
    x, bias = torch.randn(kq.GEMM_ROWS + 3, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(kq.dequant_gemm(x, pw, bias), kq.dequant_matmul(x, pw, bias), rtol=1e-5, atol=1e-4)


def test_quant_linear_rebinds_its_kernel_arguments():
    """QuantLinear binds the kernel's arguments once (decode fast path); changing the activation mode or moving
    the module drops them, so the next call uses the new mode and buffers, never stale pointers."""
    from tierlm.models.linear import QuantLinear

    g = torch.Generator().manual_seed(3)
    pw = quantize(torch.randn(40, 96, generator=g), "q4_1")
    bias = torch.randn(40, generator=g)
    lin = QuantLinear(pw, bias)
    x = torch.randn(3, 2, 96, generator=g)
    x2 = x.view(6, 96)
    torch.testing.assert_close(lin(x).view(6, 40), kq.reference_qmatmul(x2, pw, bias, "int16"), rtol=1e-4, atol=1e-4)
    lin.activations = "fp32"
    torch.testing.assert_close(lin(x).view(6, 40), kq.dequant_matmul(x2, pw, bias), rtol=1e-5, atol=1e-5)
    lin.activations = "int8"
    want8 = kq.reference_qmatmul(x2, pw, bias, "int8")
    torch.testing.assert_close(lin(x).view(6, 40), want8, rtol=1e-4, atol=1e-4)
    moved = QuantLinear(pw, bias, "int8")
    moved(x)
    moved.to(torch.float32)  # _apply: the bound pointers are dropped
    assert "_plan" not in moved.__dict__
    torch.testing.assert_close(moved(x).view(6, 40), want8, rtol=1e-4, atol=1e-4)
    # many rows take the dequantize-and-GEMM route: fp32 activations whatever the mode
    xl = torch.randn(kq.GEMM_ROWS, 96, generator=g)
    torch.testing.assert_close(moved(xl), kq.dequant_matmul(xl, pw, bias), rtol=1e-5, atol=1e-4)


def test_embedding_rows_dequantize_natively():
    from tierlm.models.linear import QuantEmbedding, QuantLinear

    pw = quantize(torch.randn(50, 64), "q8_0")
    ids = torch.tensor([[3, 49, 0], [16, 15, 3]])
    assert torch.equal(kq.dequantize_rows(pw, ids.reshape(-1)), dequantize(pw)[ids.reshape(-1)])
    emb = QuantEmbedding(QuantLinear(pw), torch.float32)
    assert torch.equal(emb(ids), dequantize(pw)[ids])
    with pytest.raises(IndexError, match="outside the embedding table"):
        kq.dequantize_rows(pw, torch.tensor([50]))


@pytest.mark.parametrize("activations", ["int16", "fp32"])
def test_fused_mlp_matches_the_modules(activations):
    """quant_mlp (one native call: gate_up, silu * up, down) equals the two QuantLinear modules with torch's
    silu in between, for decode-sized batches; prefill-sized batches are left to the modules."""
    from tierlm.models.linear import QuantLinear, quant_mlp

    g = torch.Generator().manual_seed(5)
    gate_up = QuantLinear(quantize(torch.randn(2 * 96, 64, generator=g), "q4_1"), activations=activations)
    down = QuantLinear(quantize(torch.randn(64, 96, generator=g), "q8_0"), activations=activations)
    for m in (1, 5):
        x = torch.randn(m, 64, generator=g)
        gate, up = gate_up(x).split(96, dim=-1)
        want = down(torch.nn.functional.silu(gate) * up)
        torch.testing.assert_close(quant_mlp(gate_up, down, x), want, rtol=1e-4, atol=1e-4)
    assert quant_mlp(gate_up, down, torch.randn(kq.GEMM_ROWS, 64)) is None
    assert quant_mlp(torch.nn.Linear(64, 192), down, torch.randn(1, 64)) is None
