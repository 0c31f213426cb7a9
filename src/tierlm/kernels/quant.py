"""The weight-quantized matmul (quant.c, built into the same library as cpu.c): y = x W^T + b with W a
`tierlm.quant.weights.PackedWeight`.

    qmatmul(x, pw, bias, activations="int16")
        the native kernel. activations "int16" / "int8": x rounded per 32 inputs to 16- / 8-bit integers
        (amax / 32512 or / 127 steps; int8 is llama.cpp's scheme), exact integer dot products (VNNI vpdpbusd
        on AVX-512 VNNI: int16 as two int8 planes, 256 hi + lo; the portable loop elsewhere); "fp32": x as it
        is times the codes widened in registers, i.e. the dequantized weight's product up to summation order
        (compute-bound: 2-3x slower)
    reference_qmatmul(x, pw, bias, levels)  the integer modes' PyTorch definition: the same rounded activations
                                    times the dequantized weight, in fp32 (the tests compare the two)
    dequant_matmul(x, pw, bias)     fp32 activations times the dequantized weight: the fp32 mode's definition,
                                    and the fallback when the native kernel is unavailable
    dequant_gemm(x, pw, bias)       the same product for many rows (prefill, M >= GEMM_ROWS): the weight
                                    dequantized natively into a reused scratch buffer, then one fp32 GEMM
                                    (MKL): exact fp32 activations, and faster there than the integer kernel
    fp8_scaled_mm(x, w8, scales, bias)  FP8 weights on a GPU the DeepSeek-V3 way: activations rounded to e4m3 per
                                    row and 128 inputs, one torch._scaled_mm per 128-input block with row-wise
                                    scales, summed in fp32

FP8 weights (quant.weights FP8_FORMATS) run natively with fp32 activations only (whatever `activations` says):
e4m3 codes widened in registers, exact up to summation order.

`qmatmul_usable()` says whether the native kernel is built and passed its own self-check; that check is
separate from cpu.py's, so a quantized-kernel failure never turns off the attention kernels.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading

import torch
import torch.nn.functional as F

from tierlm.core.registry import QUANT_ACTIVATIONS
from tierlm.kernels import cpu as _cpu
from tierlm.quant.weights import (FP8_BLOCK, FP8_MAX, QBLOCK, PackedWeight, codes_of, dequantize, expand_blocks,
                                  quantize, row_params)

log = logging.getLogger(__name__)
_P, _I64, _INT = _cpu._P, _cpu._I64, _cpu._INT


@functools.cache
def _lib():
    lib = _cpu._library()
    if lib is None:
        return None
    lib.tierlm_qmatmul.argtypes = [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT, _INT]
    lib.tierlm_qmatmul.restype = _INT
    lib.tierlm_qmatmul_f32.argtypes = [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT]
    lib.tierlm_qmatmul_f32.restype = _INT
    lib.tierlm_qdequant_t.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _INT, _INT]
    lib.tierlm_qdequant_t.restype = _INT
    lib.tierlm_qdequant_rows.argtypes = [_P, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _INT]
    lib.tierlm_qdequant_rows.restype = _INT
    lib.tierlm_qmlp_run.argtypes = [ctypes.POINTER(_QLinearArgs), ctypes.POINTER(_QLinearArgs), _P, _P, _I64]
    lib.tierlm_qmlp_run.restype = _INT
    lib.tierlm_qlinear_run.argtypes = [ctypes.POINTER(_QLinearArgs), _P, _P, _I64]
    lib.tierlm_qlinear_run.restype = _INT
    lib.tierlm_fp8_matmul.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]
    lib.tierlm_fp8_matmul.restype = _INT
    lib.tierlm_fp8_dequant_t.argtypes = [_P, _P, _P, _I64, _I64, _INT]
    lib.tierlm_fp8_dequant_t.restype = _INT
    lib.tierlm_fp8_dequant_rows.argtypes = [_P, _P, _P, _I64, _P, _I64, _I64]
    lib.tierlm_fp8_dequant_rows.restype = _INT
    lib.tierlm_decode_layers.argtypes = [ctypes.POINTER(_StackDims), ctypes.POINTER(_LayerArgs), _P, _P, _P, _P, _P, _P,
                                         _I64, _P, _I64]
    lib.tierlm_decode_layers.restype = _INT
    lib.tierlm_qmatmul_vector.argtypes = []
    lib.tierlm_qmatmul_vector.restype = _INT
    if not _qmatmul_ok(lib):
        log.warning("tierlm's quantized matmul failed its self-check; quantized linears use the PyTorch path")
        return None
    return lib


def qmatmul_usable() -> bool:
    return _lib() is not None


def vector_path() -> bool:
    """True when the AVX-512 VNNI path is compiled in (else the portable loop runs)."""
    lib = _lib()
    return bool(lib is not None and lib.tierlm_qmatmul_vector())


class _QLinearArgs(ctypes.Structure):
    _fields_ = [("w", _P), ("scales", _P), ("mins", _P), ("bias", _P), ("n", _I64), ("k", _I64), ("group", _I64),
                ("bits", ctypes.c_int32), ("act_bits", ctypes.c_int32), ("fp8", ctypes.c_int32)]


class _LayerArgs(ctypes.Structure):
    _fields_ = [("qkv", ctypes.POINTER(_QLinearArgs)), ("o", ctypes.POINTER(_QLinearArgs)),
                ("gate_up", ctypes.POINTER(_QLinearArgs)), ("down", ctypes.POINTER(_QLinearArgs)),
                ("ln_in", _P), ("ln_post", _P), ("kv", _P)]


class _StackDims(ctypes.Structure):
    _fields_ = [("layers", _I64), ("hidden", _I64), ("hq", _I64), ("hkv", _I64), ("d", _I64), ("num_blocks", _I64),
                ("bs", _I64), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


ACTIVATIONS = QUANT_ACTIVATIONS
_ACT_BITS = {"int8": 8, "int16": 16, "fp32": 32}
# Rows from which a product dequantizes the weight and runs one fp32 GEMM instead of the integer kernel: measured
# on the default model's shapes (2-core AVX-512 VNNI box), the int16 kernel is ahead up to ~128 rows of 576 x 3072
# and behind from ~128 on the smaller shapes; at 512 rows the GEMM route is 1.1-1.8x faster and within ~5% of
# the fp32 model's oneDNN linears.
GEMM_ROWS = 160
# FP8 codes cost more to widen than 4-/8-bit integers (through fp16): the GEMM route wins from ~48-64 rows (measured
# on the same shapes: 64 rows even, 128 rows 1.3-1.5x faster by GEMM)
FP8_GEMM_ROWS = 64


def gemm_rows(pw: PackedWeight) -> int:
    """Rows from which `pw`'s product takes the dequantize-and-GEMM route."""
    return FP8_GEMM_ROWS if pw.fp8 else GEMM_ROWS

_scratch = threading.local()
LEVELS = {"int8": 127, "int16": 32512}  # activation rounding steps per 32-block: amax / levels (int16: 127 x 256)


def _call(lib, x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, portable: bool,
          activations: str = "int16") -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != pw.k or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"qmatmul takes fp32 x [M, {pw.k}] with unit inner stride, got {tuple(x.shape)} {x.dtype}")
    y = torch.empty(x.shape[0], pw.n, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    if pw.fp8:
        rc = lib.tierlm_fp8_matmul(x.data_ptr(), x.stride(0), pw.data.data_ptr(), pw.scales.data_ptr(),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(), pw.n, x.shape[0], pw.n,
                                   pw.k, int(portable))
        if rc != 0:
            raise RuntimeError(f"tierlm_fp8_matmul failed (rc {rc}) on x {tuple(x.shape)}, weight [{pw.n}, {pw.k}]")
        return y
    args = (x.data_ptr(), x.stride(0), pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), pw.n, x.shape[0], pw.n, pw.k, pw.group, pw.bits)
    if activations == "fp32":
        rc = lib.tierlm_qmatmul_f32(*args, int(portable))
    else:
        rc = lib.tierlm_qmatmul(*args, 16 if activations == "int16" else 8, int(portable))
    if rc != 0:
        raise RuntimeError(f"tierlm_qmatmul failed (rc {rc}) on x {tuple(x.shape)}, weight [{pw.n}, {pw.k}]")
    return y


def qmatmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, portable: bool = False,
            activations: str = "int16") -> torch.Tensor:
    """x [M, k] fp32 -> [M, n]. Callers check qmatmul_usable() first."""
    return _call(_lib(), x, pw, bias, portable, activations)


class QLinearPlan:
    """A quantized linear's fixed kernel arguments, bound once: `run(x)` is qmatmul(x, pw, bias, activations)
    for a contiguous fp32 x [M, k] with M < max_rows (gemm_rows(pw)), a few microseconds faster per call (the
    decode path runs five of these per layer). Holds references to the tensors it points into."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None, activations: str):
        self.lib, self.max_rows = _lib(), gemm_rows(pw)
        self.n, self.keep = pw.n, (pw.data, pw.scales, pw.mins, bias)
        self.args = _QLinearArgs(pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(),
                                 None if bias is None else bias.data_ptr(), pw.n, pw.k, pw.group, pw.bits,
                                 32 if pw.fp8 else _ACT_BITS[activations], int(pw.fp8))
        self.ref = ctypes.byref(self.args)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        if self.lib.tierlm_qlinear_run(self.ref, x.data_ptr(), y.data_ptr(), x.shape[0]) != 0:
            raise RuntimeError(f"tierlm_qlinear_run failed on x {tuple(x.shape)}")
        return y


def mlp_run(gate_up: QLinearPlan, down: QLinearPlan, x: torch.Tensor) -> torch.Tensor:
    """down(silu(g) * u) with [g | u] = gate_up(x) in one native call (x contiguous fp32, fewer than max_rows
    rows): the decode path of a gated MLP."""
    y = torch.empty(x.shape[0], down.n, dtype=torch.float32)
    if gate_up.lib.tierlm_qmlp_run(gate_up.ref, down.ref, x.data_ptr(), y.data_ptr(), x.shape[0]) != 0:
        raise RuntimeError(f"tierlm_qmlp_run failed on x {tuple(x.shape)}")
    return y


class DecodeStack:
    """A decode step's decoder layers as one native call (quant.c tierlm_decode_layers): the same operations as the
    Python path in the same order, bit for bit, without the dozen Python and torch calls per layer between them.
    `layers`: per layer (qkv, o, gate_up, down QLinearPlans, input_layernorm weight, post_attention_layernorm
    weight); `run` returns (MLP output, residual) of the last layer, or None when the attention kernel does not
    take the shape (nothing was touched)."""

    def __init__(self, layers: list[tuple], hidden: int, hq: int, hkv: int, d: int, eps: float, scale: float):
        self.lib = _lib()
        self.max_rows = min(min(p.max_rows for p in layer[:4]) for layer in layers)
        self.keep = layers
        self.args = (_LayerArgs * len(layers))()
        for a, (qkv, o, gate_up, down, ln_in, ln_post) in zip(self.args, layers):
            a.qkv, a.o, a.gate_up, a.down = (ctypes.pointer(p.args) for p in (qkv, o, gate_up, down))
            a.ln_in, a.ln_post = ln_in.data_ptr(), ln_post.data_ptr()
        self.dims = _StackDims(len(layers), hidden, hq, hkv, d, 0, 0, eps, scale)
        self.hidden, self.kv_ptrs = hidden, None

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: list[torch.Tensor], slots: torch.Tensor,
            tables: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [M, hidden] embeddings; cos / sin [M, d]; kv: each layer's cache [2, num_blocks, bs, hkv, d] fp32;
        slots [M], tables [M, max_blocks], lens [M] int64 (contiguous)."""
        ptrs = tuple(t.data_ptr() for t in kv)
        if ptrs != self.kv_ptrs:
            for a, p in zip(self.args, ptrs):
                a.kv = p
            self.kv_ptrs, self.dims.num_blocks, self.dims.bs = ptrs, kv[0].shape[1], kv[0].shape[2]
        x = x.contiguous().clone()
        residual = torch.empty_like(x)
        rc = self.lib.tierlm_decode_layers(ctypes.byref(self.dims), self.args, x.data_ptr(), residual.data_ptr(),
                                           cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                                           tables.shape[1], lens.data_ptr(), x.shape[0])
        if rc == 1:
            return None
        if rc != 0:
            raise RuntimeError(f"tierlm_decode_layers failed (rc {rc}) on {x.shape[0]} rows")
        return x, residual


def dequant_gemm(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, k] fp32 times the dequantized weight, through one GEMM on a per-thread scratch copy of W^T."""
    need = pw.k * pw.n
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _scratch.buf = torch.empty(need, dtype=torch.float32)
    wt = _dequant_t(_lib(), pw, out=buf[:need].view(pw.k, pw.n))
    return torch.mm(x, wt) if bias is None else torch.addmm(bias, x, wt)


def dequantize_rows(pw: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    """quant.weights.dequantize(pw, rows=rows) natively (equal bit for bit): an embedding lookup. IndexError
    for a row outside the table."""
    return _dequant_rows(_lib(), pw, rows)


def _dequant_rows(lib, pw: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    rows = rows.to(torch.int64).contiguous()
    out = torch.empty(rows.numel(), pw.k, dtype=torch.float32)
    if pw.fp8:
        rc = lib.tierlm_fp8_dequant_rows(pw.data.data_ptr(), pw.scales.data_ptr(), rows.data_ptr(), rows.numel(),
                                            out.data_ptr(), pw.n, pw.k)
    else:
        rc = lib.tierlm_qdequant_rows(pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(), rows.data_ptr(),
                                         rows.numel(), out.data_ptr(), pw.n, pw.k, pw.group, pw.bits)
    if rc != 0:
        raise IndexError(f"a token id outside the embedding table [0, {pw.n})")
    return out


def dequantize_t(pw: PackedWeight) -> torch.Tensor:
    """quant.weights.dequantize(pw).T as a contiguous [k, n] tensor, computed natively (equal bit for bit)."""
    return _dequant_t(_lib(), pw)


def _dequant_t(lib, pw: PackedWeight, portable: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(pw.k, pw.n, dtype=torch.float32) if out is None else out
    if pw.fp8:
        rc = lib.tierlm_fp8_dequant_t(pw.data.data_ptr(), pw.scales.data_ptr(), out.data_ptr(), pw.n, pw.k,
                                      int(portable))
    else:
        rc = lib.tierlm_qdequant_t(pw.data.data_ptr(), pw.scales.data_ptr(), pw.mins.data_ptr(), out.data_ptr(), pw.n,
                                   pw.k, pw.group, pw.bits, int(portable))
    if rc != 0:
        raise RuntimeError(f"tierlm_qdequant_t failed on a weight [{pw.n}, {pw.k}]")
    return out


def quantize_activations(x: torch.Tensor, levels: int = 32512) -> torch.Tensor:
    """x [M, K] rounded as the kernel rounds it: per 32-block, d = amax / levels, q = round(x * (1 / d))
    (nearest even), returned dequantized (q * d) in fp32."""
    xb = x.float().reshape(x.shape[0], -1, QBLOCK)
    d = xb.abs().amax(-1, keepdim=True) / float(levels)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(x.shape)


def reference_qmatmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                      activations: str = "int16") -> torch.Tensor:
    """The definition of qmatmul in `activations` mode (FP8 weights: always fp32 activations)."""
    if activations == "fp32" or pw.fp8:
        return dequant_matmul(x, pw, bias)
    return dequant_matmul(quantize_activations(x, LEVELS[activations]), pw, bias)


def fp8_act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 16) -> e4m3 [M, K] and fp32 scales [M, ceil(K / 128)]: one scale per row and 128
    inputs, amax / 448 (DeepSeek-V3's 1 x 128 activation tiles)."""
    m, k = x.shape
    nkb = -(-k // FP8_BLOCK)
    xp = F.pad(x.float(), (0, nkb * FP8_BLOCK - k)).view(m, nkb, FP8_BLOCK)
    s = xp.abs().amax(-1) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (xp / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(m, -1)[:, :k]
    return q, s


def fp8_weight_blocks(pw: PackedWeight) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An FP8 PackedWeight as torch._scaled_mm operands: per 128-input block, the e4m3 weight [n, kb] (contiguous,
    so `.t()` is the column-major operand) and its row scales [1, n] fp32."""
    codes = codes_of(pw).view(torch.float8_e4m3fn)
    sc, _ = row_params(pw)
    return [(codes[:, b * FP8_BLOCK:(b + 1) * FP8_BLOCK].contiguous(), sc[:, b].reshape(1, -1).contiguous())
            for b in range(sc.shape[1])]


def fp8_scaled_mm(x: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]],
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times FP8 weight blocks (fp8_weight_blocks) through torch._scaled_mm: x rounded to e4m3 per row and
    128 inputs, one scaled product per block with row-wise scales (a: [M, 1], b: [1, n]), summed in fp32. The
    DeepSeek-V3 recipe for FP8 tensor cores; it runs wherever torch._scaled_mm does (CUDA with FP8, and the CPU
    build, which the tests use). Its definition: reference_fp8_scaled_mm."""
    q, s = fp8_act_quant(x)
    y = None
    out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32  # row-wise scaling on CUDA: bf16 out
    for b, (wb, sb) in enumerate(blocks):
        kb = wb.shape[1]
        part = torch._scaled_mm(q[:, b * FP8_BLOCK:b * FP8_BLOCK + kb].contiguous(), wb.t(),
                                scale_a=s[:, b:b + 1].contiguous(), scale_b=sb, out_dtype=out_dtype).float()
        y = part if y is None else y + part
    return y if bias is None else y + bias.float()


def reference_fp8_scaled_mm(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_scaled_mm's definition: the activations rounded as it rounds them, times the dequantized weight."""
    q, s = fp8_act_quant(x)
    xd = q.float() * expand_blocks(s, (1, FP8_BLOCK), tuple(x.shape))
    return F.linear(xd, dequantize(pw), None if bias is None else bias.float())


def dequant_matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.float(), dequantize(pw), bias)


def _qmatmul_ok(lib) -> bool:
    """Native (both paths) == the reference on small shapes of each layout: 4 and 8 bits, groups 32 and the
    whole row, FP8 with a short last block, a padded last tile, 1 to 5 rows (the 4-row chunks and a remainder)."""
    g = torch.Generator().manual_seed(1)
    ok = True
    for fmt, n, k, group in (("q4_1", 40, 64, None), ("q8_0", 16, 96, None), ("int8", 19, 64, None),
                             ("int4", 33, 128, 64), ("fp8", 21, 160, None)):
        w = torch.randn(n, k, generator=g)
        pw = quantize(w, fmt, group)
        bias = torch.randn(n, generator=g)
        for m in (1, 5):
            x = torch.randn(m, k, generator=g)
            ok = ok and all(torch.equal(_dequant_t(lib, pw, p), dequantize(pw).T) for p in (False, True))
            rows = torch.tensor([0, n - 1, n // 2], dtype=torch.int64)
            ok = ok and torch.equal(_dequant_rows(lib, pw, rows), dequantize(pw)[rows])
            for act in ACTIVATIONS:
                want = reference_qmatmul(x, pw, bias, act)
                got = [_call(lib, x, pw, bias, portable, act) for portable in (False, True)]
                ok = ok and all(torch.allclose(y, want, rtol=1e-4, atol=1e-4) for y in got) and torch.equal(*got)
    return ok
