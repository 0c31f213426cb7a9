"""Weight formats (quant/weights.py): GGUF blocks map onto the packed layout without changing a value, the
fp32 quantizers follow llama.cpp's rules, and the packed layout round-trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tierlm.core.errors import InvalidParameterError
from tierlm.quant.weights import (FP8_FORMATS, GGUF_BLOCKS, WEIGHT_FORMATS, check_shape, codes_of, concat_rows,
                                  dequantize, from_gguf_blocks, pack, permute_rows, quantize, row_params)

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_gguf_blocks_run_as_stored(kind):
    """Blocks written by gguf-py's quantizer, packed: dequantizing them gives gguf-py's own dequantization,
    bit for bit (same d, m and codes; the -8 d / -16 d / -128 d offsets are exact in fp16; 5-bit codes in bytes)."""
    g = np.random.default_rng(0)
    w = (g.standard_normal((37, 160)) * g.uniform(0.01, 3, (37, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, T[kind])
    want = gguf.quants.dequantize(raw, T[kind]).reshape(37, 160)
    pw = from_gguf_blocks(kind, raw.reshape(-1), 37, 160)
    assert pw.fmt == kind.lower() and pw.n == 37 and pw.k == 160
    assert torch.equal(dequantize(pw), torch.from_numpy(want))


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K"])
def test_k_quant_blocks_keep_their_codes_with_fp16_scales(kind):
    """K-quant super-blocks (random bytes, any of which is a valid block, with sane d / dmin; gguf-py has no
    K-quant quantizer) packed: gguf-py's dequantization but for the sub-block scale d * sc and min dmin * m rounded
    to fp16: each value within 2^-11 of its two terms (the codes are the same)."""
    g = np.random.default_rng(2)
    size, per, bits = GGUF_BLOCKS[kind]
    n, k = 21, 512
    raw = g.integers(0, 256, (n, k // per, size), dtype=np.uint8)
    for at, scale in ((0, 0.01), (2, 0.004)):  # d, dmin
        raw[:, :, at:at + 2] = (g.random((n, k // per, 1)) * scale + 1e-4).astype(np.float16).view(np.uint8)
    want = torch.from_numpy(gguf.quants.dequantize(raw.reshape(n, -1), T[kind]).reshape(n, k))
    pw = from_gguf_blocks(kind, raw.reshape(-1), n, k)
    assert (pw.fmt, pw.bits, pw.group) == (kind.lower(), bits, 32)
    got = dequantize(pw)
    sc, mn = row_params(pw)
    span = (sc.float().abs() * (2 ** (5 if kind == "Q5_K" else 4) - 1) + mn.float().abs()).repeat_interleave(32, 1)
    assert ((got - want).abs() <= 2 ** -11 * span + 1e-9).all()
    assert (got != want).any(), "the scales are rounded: not every value can be exact"


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_fp32_quantizers_follow_llama_cpp(kind):
    """quantize(w, "q4_1") etc. give the values llama.cpp's (gguf-py's) quantizer gives, within one code step
    at exact rounding ties (fp32 vs numpy order of operations)."""
    g = np.random.default_rng(1)
    w = g.standard_normal((16, 256)).astype(np.float32)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, T[kind]), T[kind]).reshape(16, 256)
    ours = dequantize(quantize(torch.from_numpy(w), kind.lower())).numpy()
    step = np.abs(w).max() / (7 if kind != "Q8_0" else 127)
    assert np.mean(ours == ref) > 0.99
    assert np.abs(ours - ref).max() <= step


@pytest.mark.parametrize("fmt", [f for f in WEIGHT_FORMATS if f not in FP8_FORMATS])  # FP8: test_fp8_weights.py
def test_quantization_error_is_bounded(fmt):
    """Each value is within half a code step of its group's scale (4-bit Q4_0: one step, its range is
    asymmetric)."""
    w = torch.randn(48, 192) * torch.rand(48, 1) * 4
    pw = quantize(w, fmt)
    err = (dequantize(pw) - w).abs().view(48, -1, pw.group)
    d = pw.scales.transpose(1, 2).reshape(-1, 192 // pw.group)[:48].float().abs().unsqueeze(-1)
    bound = (1.0 if fmt == "q4_0" else 0.5) * d + 1e-3 * w.abs().max()  # + fp16 rounding of d and m
    assert (err <= bound).all()


def test_pack_round_trips_and_pads():
    codes = torch.randint(0, 16, (21, 64), dtype=torch.uint8)
    scales, mins = torch.rand(21, 2).half(), torch.randn(21, 2).half()
    pw = pack("int4", codes, scales, mins, 4)
    assert pw.data.shape == (2, 64 * 4 // 8 * 16) and pw.scales.shape == (2, 2, 16)
    assert torch.equal(codes_of(pw), codes)
    assert (pw.scales[1, :, 5:] == 0).all(), "padding rows are zero"
    want = codes.float().view(21, 2, 32) * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
    assert torch.equal(dequantize(pw), want.view(21, 64))
    codes8 = torch.randint(0, 256, (5, 96), dtype=torch.uint8)
    pw8 = pack("q8_0", codes8, torch.rand(5, 3).half(), torch.rand(5, 3).half(), 8)
    assert torch.equal(codes_of(pw8), codes8)


def test_row_permutation_and_fusion_are_exact():
    a, b = quantize(torch.randn(20, 64), "q4_1"), quantize(torch.randn(12, 64), "q4_1")
    order = torch.randperm(20)
    assert torch.equal(dequantize(permute_rows(a, order)), dequantize(a)[order])
    assert torch.equal(dequantize(concat_rows([a, b])), torch.cat([dequantize(a), dequantize(b)]))
    c = quantize(torch.randn(12, 64), "q8_0")  # 4- and 8-bit parts (a GGUF keeping v in Q8_0): fused in 8 bits
    mixed = concat_rows([a, c])
    assert mixed.bits == 8 and mixed.fmt == "q4_1+q8_0"
    assert torch.equal(dequantize(mixed), torch.cat([dequantize(a), dequantize(c)]))
    with pytest.raises(ValueError):
        concat_rows([a, quantize(torch.randn(12, 96), "q4_1")])  # other inputs
    with pytest.raises(ValueError):
        concat_rows([quantize(torch.randn(12, 128), "int4", 64), quantize(torch.randn(12, 128), "int4", 32)])


def test_shapes_that_cannot_take_a_format_name_the_fix():
    with pytest.raises(InvalidParameterError, match=r"576 inputs, not a multiple of the int4 group 128.*group that divides 576 \(e\.g\. 64\)"):
        check_shape(WEIGHT_FORMATS["int4"], 576, 576, 128, "mlp")
    with pytest.raises(InvalidParameterError, match="int4 group 48 is not supported"):
        check_shape(WEIGHT_FORMATS["int4"], 16, 96, 48, "w")
    with pytest.raises(InvalidParameterError, match="100 inputs, not a multiple of the q4_1 group 32"):
        quantize(torch.randn(4, 100), "q4_1", what="w")
    assert check_shape(WEIGHT_FORMATS["int8"], 7, 96, None, "w") == 96  # per row: the whole input
    with pytest.raises(InvalidParameterError, match="unknown weight format"):
        quantize(torch.randn(4, 64), "q3")
