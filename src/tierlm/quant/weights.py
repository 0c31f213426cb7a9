"""Weight formats for quantized linears: one packed layout (codes + per-group fp16 scale and offset) that
GGUF's Q4_0 / Q4_1 / Q8_0 blocks and tierlm's own int4 / int8 weights all map onto exactly, and FP8 e4m3 with
block scales (DeepSeek-V3's weight recipe).

A weight [N, K] is stored as unsigned codes u of `bits` bits with, per output row and group of `group`
consecutive inputs, an fp16 scale d and an fp16 offset m: value = d * u + m.

    format   bits  group          from
    q4_0       4   32             GGUF Q4_0 blocks (m = -8 d), or fp32 by llama.cpp's rule
    q4_1       4   32             GGUF Q4_1 blocks (m = the block min), or fp32
    q8_0       8   32             GGUF Q8_0 blocks (u = q + 128, m = -128 d), or fp32
    int4       4   32 / 64 / 128  fp32, asymmetric per group (min / max), as Q4_1 with a wider group
    int8       8   K (per row)    fp32, symmetric per output channel (u = q + 128, m = -128 d)

The GGUF mappings are exact: -8 d and -128 d are fp16 multiples of d by a power of two. The packed
layout (`PackedWeight`) interleaves the codes for the CPU kernel (kernels/quant.c describes it); the
PyTorch `dequantize` here is the definition the kernel is tested against.

FP8 (`fp8`, `fp8_ue8m0`): each weight one e4m3 byte (torch.float8_e4m3fn), value = e4m3(u) * s, with one
scale s per block of 128 output rows x 128 inputs (the blocks at the right and bottom edges may be smaller):
fp32 s = amax / 448 (DeepSeek-V3's weight_scale_inv), or for fp8_ue8m0 that rounded up to a power of two
(DeepSeek's UE8M0 rule). The packed form keeps one fp32 scale per row and 128-input block (the block scale
repeated over its rows, so fused projections keep their own blocks) and the codes as [tile][k][16 rows];
`mins` is empty.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tierlm.core.errors import InvalidParameterError
from tierlm.core.registry import WEIGHT_FORMAT_NAMES
from tierlm.quant.fp8 import FP8_TYPES, ue8m0_decode, ue8m0_encode

TILE = 16  # output rows per tile of the packed layout
QBLOCK = 32  # activation block; every group is a multiple of it


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int
    group: int | None  # None: the whole row (per output channel)
    doc: str


WEIGHT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("q4_0", 4, 32, "GGUF Q4_0: 4-bit, symmetric, group 32"),
    WeightFormat("q4_1", 4, 32, "GGUF Q4_1: 4-bit, scale + min, group 32"),
    WeightFormat("q8_0", 8, 32, "GGUF Q8_0: 8-bit, symmetric, group 32"),
    WeightFormat("int4", 4, 32, "4-bit, scale + min per group (32, 64 or 128)"),
    WeightFormat("int8", 8, None, "8-bit, symmetric, one scale per output channel"),
    WeightFormat("fp8", 8, 128, "FP8 e4m3, an fp32 scale per 128x128 block (DeepSeek-V3)"),
    WeightFormat("fp8_ue8m0", 8, 128, "FP8 e4m3, a power-of-two (UE8M0) scale per 128x128 block"),
)}
FP8_FORMATS = ("fp8", "fp8_ue8m0")
FP8_BLOCK = 128  # rows and inputs per FP8 scale block
FP8_MAX = FP8_TYPES["e4m3"].max  # 448
INT4_GROUPS = (32, 64, 128)
assert tuple(sorted(WEIGHT_FORMATS)) == tuple(sorted(WEIGHT_FORMAT_NAMES)), "core.registry names the formats too"


def weight_format(name: str) -> WeightFormat:
    if name not in WEIGHT_FORMATS:
        raise InvalidParameterError(f"unknown weight format {name!r}", f"use one of {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[name]


@dataclass
class PackedWeight:
    """A quantized [n, k] weight in the kernel's layout: `data` uint8 [tiles, k * bits / 8 * 16] (interleaved
    codes), `scales` / `mins` fp16 [tiles, k / group, 16]; rows past n are zero. FP8: `data` [tiles, k * 16]
    ([tile][k][16 rows]), `scales` fp32 [tiles, ceil(k / 128), 16], `mins` empty."""
    fmt: str
    bits: int
    group: int
    n: int
    k: int
    data: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def to(self, device: torch.device | str) -> "PackedWeight":
        return PackedWeight(self.fmt, self.bits, self.group, self.n, self.k, self.data.to(device),
                            self.scales.to(device), self.mins.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.mins))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The three tensors under `prefix` (for safetensors), with the shape facts in a small int tensor."""
        meta = torch.tensor([self.bits, self.group, self.n, self.k], dtype=torch.int64)
        return {f"{prefix}.qdata": self.data, f"{prefix}.qscales": self.scales, f"{prefix}.qmins": self.mins,
                f"{prefix}.qmeta": meta}

    @classmethod
    def from_tensors(cls, fmt: str, tensors: dict[str, torch.Tensor], prefix: str) -> "PackedWeight":
        bits, group, n, k = (int(v) for v in tensors[f"{prefix}.qmeta"].tolist())
        pw = cls(fmt, bits, group, n, k, tensors[f"{prefix}.qdata"], tensors[f"{prefix}.qscales"],
                 tensors[f"{prefix}.qmins"])
        pw.check()
        return pw

    @property
    def fp8(self) -> bool:
        return self.fmt in FP8_FORMATS

    def check(self) -> None:
        """Shapes consistent with (bits, group, n, k); ValueError otherwise (a damaged cache entry)."""
        tiles = -(-self.n // TILE)
        if self.fp8:
            want = ((tiles, self.k * TILE), (tiles, -(-self.k // FP8_BLOCK), TILE))
            got = (tuple(self.data.shape), tuple(self.scales.shape))
            if (self.bits != 8 or self.group != FP8_BLOCK or self.k % QBLOCK or got != want or self.mins.numel()
                    or self.data.dtype != torch.uint8 or self.scales.dtype != torch.float32):
                raise ValueError(f"packed weight {self.fmt} [{self.n}, {self.k}] has inconsistent tensors {got}")
            return
        want = ((tiles, self.k * self.bits // 8 * TILE), (tiles, self.k // self.group, TILE))
        got = (tuple(self.data.shape), tuple(self.scales.shape))
        if (self.bits not in (4, 8) or self.group % QBLOCK or self.k % self.group or got != want
                or tuple(self.mins.shape) != want[1] or self.data.dtype != torch.uint8
                or self.scales.dtype != torch.float16 or self.mins.dtype != torch.float16):
            raise ValueError(f"packed weight {self.fmt} [{self.n}, {self.k}] has inconsistent tensors {got}")


def check_shape(fmt: WeightFormat, n: int, k: int, group: int | None, what: str) -> int:
    """The group a [n, k] weight gets in `fmt`; InvalidParameterError naming the fix when k cannot take it."""
    if fmt.name in FP8_FORMATS:
        if k % QBLOCK:
            raise InvalidParameterError(f"{what} has {k} inputs, not a multiple of {QBLOCK} ({fmt.name} needs it)",
                                        "use --quantization none")
        return FP8_BLOCK
    g = k if fmt.group is None else (group or fmt.group)
    if fmt.name == "int4" and g not in INT4_GROUPS:
        raise InvalidParameterError(f"int4 group {g} is not supported", f"use a group of {INT4_GROUPS}")
    if k % g or g % QBLOCK:
        fix = (f"use a group that divides {k} (e.g. {max(x for x in INT4_GROUPS if k % x == 0)})"
               if fmt.name == "int4" and any(k % x == 0 for x in INT4_GROUPS)
               else "use --quantization none or a format whose group divides it")
        raise InvalidParameterError(f"{what} has {k} inputs, not a multiple of the {fmt.name} group {g}"
                                    + ("" if g % QBLOCK == 0 else f" (groups must be multiples of {QBLOCK})"), fix)
    return g


# ---- packing -------------------------------------------------------------------------------------------
def pack(fmt: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int) -> PackedWeight:
    """codes uint8 [n, k] (< 2**bits), scales / mins fp16 [n, k / group] -> the kernel's interleaved layout.
    FP8: codes the e4m3 bytes [n, k], scales fp32 [n, ceil(k / 128)], mins None."""
    if fmt in FP8_FORMATS:
        return _pack_fp8(fmt, codes, scales)
    n, k = codes.shape
    group = k // scales.shape[1]
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, k)])
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
        mins = torch.cat([mins, mins.new_zeros(pad, mins.shape[1])])
    c = codes.to(torch.uint8).view(tiles, TILE, k)
    if bits == 8:  # [tile, k/4, 16 rows, 4]
        data = c.view(tiles, TILE, k // 4, 4).permute(0, 2, 1, 3)
    else:  # [tile, k/8, 16 rows, 4]: inputs 8c + j in the low nibble, 8c + 4 + j in the high one
        c8 = c.view(tiles, TILE, k // 8, 2, 4)
        data = (c8[:, :, :, 0] | (c8[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
    data = data.reshape(tiles, -1).contiguous()
    sc = scales.to(torch.float16).view(tiles, TILE, -1).transpose(1, 2).contiguous()
    mn = mins.to(torch.float16).view(tiles, TILE, -1).transpose(1, 2).contiguous()
    return PackedWeight(fmt, bits, group, n, k, data, sc, mn)


def _pack_fp8(fmt: str, codes: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
    n, k = codes.shape
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    c = torch.cat([codes.to(torch.uint8), codes.new_zeros(pad, k, dtype=torch.uint8)]) if pad else codes.to(torch.uint8)
    s = scales.to(torch.float32)
    s = torch.cat([s, s.new_zeros(pad, s.shape[1])]) if pad else s
    data = c.view(tiles, TILE, k).transpose(1, 2).reshape(tiles, k * TILE).contiguous()
    sc = s.view(tiles, TILE, -1).transpose(1, 2).contiguous()
    pw = PackedWeight(fmt, 8, FP8_BLOCK, n, k, data, sc, torch.empty(0, dtype=torch.float16))
    pw.check()
    return pw


def row_params(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales and offsets back in row order: two [n, k / group] fp16 tensors (FP8: fp32 scales
    [n, ceil(k / 128)] and None)."""
    sc = pw.scales.transpose(1, 2).reshape(-1, pw.scales.shape[1])[: pw.n]
    if pw.fp8:
        return sc, None
    return sc, pw.mins.transpose(1, 2).reshape(-1, pw.mins.shape[1])[: pw.n]


def codes_of(pw: PackedWeight) -> torch.Tensor:
    """The codes uint8 [n, k] back from the interleaved layout."""
    tiles = pw.data.shape[0]
    if pw.fp8:
        return pw.data.view(tiles, pw.k, TILE).transpose(1, 2).reshape(tiles * TILE, pw.k)[: pw.n]
    if pw.bits == 8:
        c = pw.data.view(tiles, pw.k // 4, TILE, 4).permute(0, 2, 1, 3)
    else:
        d = pw.data.view(tiles, pw.k // 8, TILE, 4).permute(0, 2, 1, 3)
        c = torch.stack((d & 0x0F, d >> 4), dim=3)  # [tile, 16, k/8, 2, 4]
    return c.reshape(tiles * TILE, pw.k)[: pw.n]


def dequantize(pw: PackedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight [n, k] (or only `rows`, e.g. an embedding lookup): d * u + m, computed in fp32."""
    sc, mn = row_params(pw)
    if pw.fp8:
        codes = codes_of(pw) if rows is None else pw.data.view(-1, pw.k, TILE)[rows // TILE, :, rows % TILE]
        sc = sc if rows is None else sc[rows]
        return codes.contiguous().view(torch.float8_e4m3fn).float() * expand_blocks(sc, (1, FP8_BLOCK), codes.shape)
    if rows is None:
        codes = codes_of(pw)
    else:
        codes, sc, mn = _codes_rows(pw, rows), sc[rows], mn[rows]
    u = codes.float().view(codes.shape[0], -1, pw.group)
    return (u * sc.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).view(codes.shape[0], pw.k)


def _codes_rows(pw: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    tile, r = rows // TILE, rows % TILE
    if pw.bits == 8:
        return pw.data.view(-1, pw.k // 4, TILE, 4)[tile, :, r].reshape(len(rows), pw.k)
    d = pw.data.view(-1, pw.k // 8, TILE, 4)[tile, :, r]  # [R, k/8, 4]
    return torch.stack((d & 0x0F, d >> 4), dim=2).reshape(len(rows), pw.k)


# ---- quantizing fp32 weights ------------------------------------------------------------------------------
def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    return w.float().reshape(w.shape[0], -1, group)


def expand_blocks(s: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Per-block values s [ceil(n / bn), ceil(k / bk)] -> one per element [n, k] (edge blocks cut short)."""
    return s.repeat_interleave(block[0], dim=0)[: shape[0]].repeat_interleave(block[1], dim=1)[:, : shape[1]]


def fp8_block_scales(w: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """The scale of each 128 x 128 block of w [n, k]: [ceil(n / 128), ceil(k / 128)] fp32, amax / 448 (UE8M0: rounded
    up to a power of two); a block of zeros gets 1."""
    n, k = w.shape
    bn, bk = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = w.float().new_zeros(bn * FP8_BLOCK, bk * FP8_BLOCK)
    padded[:n, :k] = w.float().abs()
    amax = padded.view(bn, FP8_BLOCK, bk, FP8_BLOCK).amax(dim=(1, 3))
    s = amax / FP8_MAX
    if ue8m0:  # quant.fp8's UE8M0 rule: the smallest power of two >= amax / 448
        s = ue8m0_decode(ue8m0_encode(torch.where(amax > 0, s, torch.ones_like(s))))
    return torch.where(amax > 0, s, torch.ones_like(s))


def quantize_fp8(w: torch.Tensor, fmt_name: str = "fp8", scales: torch.Tensor | None = None) -> PackedWeight:
    """w [n, k] in e4m3 with 128 x 128 block scales (`scales` [ceil(n / 128), ceil(k / 128)] fp32 if given, else
    computed): u = e4m3(clamp(w / s, +-448)), rounded to nearest even by torch's cast."""
    n, k = w.shape
    s = fp8_block_scales(w, fmt_name == "fp8_ue8m0") if scales is None else scales.float()
    row_s = expand_blocks(s, (FP8_BLOCK, 1), (n, s.shape[1]))  # [n, ceil(k / 128)]
    u = (w.float() / expand_blocks(s, (FP8_BLOCK, FP8_BLOCK), (n, k))).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return pack(fmt_name, u, row_s, None, 8)


def quantize(w: torch.Tensor, fmt_name: str, group: int | None = None, what: str = "weight") -> PackedWeight:
    """An fp32 / bf16 weight [n, k] quantized into `fmt_name` (rules in the module docstring)."""
    fmt = weight_format(fmt_name)
    n, k = w.shape
    g = check_shape(fmt, n, k, group, what)
    if fmt.name in FP8_FORMATS:
        return quantize_fp8(w, fmt.name)
    x = _grouped(w, g)
    if fmt.name in ("q4_1", "int4"):  # asymmetric: llama.cpp's quantize_row_q4_1 rule
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        u = ((x - lo) * inv + 0.5).floor().clamp(0, 15)
        scales, mins = d.half(), lo.half()
    elif fmt.name == "q4_0":  # symmetric around 8: d = (the signed value of largest magnitude) / -8
        idx = x.abs().argmax(-1, keepdim=True)
        d = x.gather(-1, idx) / -8
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        u = (x * inv + 8.5).floor().clamp(0, 15)
        scales = d.half()
        mins = -8 * scales
    else:  # q8_0 / int8: symmetric int8 stored with the +128 offset
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        u = torch.round(x * inv).clamp(-127, 127) + 128
        scales = d.half()
        mins = -128 * scales
    return pack(fmt.name, u.to(torch.uint8).view(n, k), scales.view(n, -1), mins.view(n, -1), fmt.bits)


# ---- GGUF blocks as stored ----------------------------------------------------------------------------------
# GGML block types the packed layout takes, bytes per block, values per block, and code width in the layout. Q4_0,
# Q4_1, Q8_0, Q5_0 and Q5_1 map exactly (5-bit codes sit in 8-bit ones; -16 d is d times a power of two); the
# K-quants Q4_K and Q5_K keep their codes and per-32 sub-block min, with the sub-block scale d * sc and min
# dmin * m (fp16 times a 6-bit integer: up to 17 significant bits) rounded to fp16, within 2^-11 of each. Q6_K's
# 16-value sub-blocks do not fit the 32-input groups: it is rounded again (quantized.py).
GGUF_BLOCKS = {"Q4_0": (18, 32, 4), "Q4_1": (20, 32, 4), "Q8_0": (34, 32, 8), "Q5_0": (22, 32, 8),
               "Q5_1": (24, 32, 8), "Q4_K": (144, 256, 4), "Q5_K": (176, 256, 8)}
GGUF_BLOCK_BYTES = {kind: size for kind, (size, _, _) in GGUF_BLOCKS.items()}
EXACT_GGUF = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1")


def _f16(b: np.ndarray) -> torch.Tensor:
    """Two bytes per value at the end of `b` ([..., 2]) as fp16."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0])


def _k_scales(sc12: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant super-block's 12 scale bytes [..., 12] -> the 6-bit scales and mins of its 8 sub-blocks
    ([..., 8] each; llama.cpp's get_scale_min_k4)."""
    q = torch.from_numpy(np.ascontiguousarray(sc12)).to(torch.int32)
    sc = torch.cat((q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)), dim=-1)
    m = torch.cat((q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)), dim=-1)
    return sc, m


def _high_bits(qh: np.ndarray) -> torch.Tensor:
    """Q5_0 / Q5_1: the 4 qh bytes [..., 4] -> bit j of the little-endian word for each of the 32 values."""
    word = torch.from_numpy(np.ascontiguousarray(qh).view("<u4")[..., 0].astype(np.int64))
    return (word.unsqueeze(-1) >> torch.arange(32)) & 1


def from_gguf_blocks(kind: str, raw: np.ndarray, n: int, k: int) -> PackedWeight:
    """A GGUF tensor's raw blocks (uint8, n rows of k values) in the packed layout (GGUF_BLOCKS says how exactly).
    Q4_0 / Q4_1 / Q5_0 / Q5_1 hold element j in the low nibble of byte j and element j + 16 in its high nibble."""
    size, per, bits = GGUF_BLOCKS[kind]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // per, size)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :, 0:2]).float(), _f16(b[:, :, 2:4]).float()  # [n, k/256]
        sc, m = _k_scales(b[:, :, 4:16])  # [n, k/256, 8]
        off = 16 if kind == "Q4_K" else 48
        qs = torch.from_numpy(b[:, :, off:off + 128].copy()).view(n, k // per, 4, 32)
        codes = torch.stack((qs & 0x0F, qs >> 4), dim=3)  # [n, k/256, 4 chunks, 2 (sub-blocks 2j, 2j+1), 32]
        if kind == "Q5_K":  # bit 2j / 2j + 1 of qh[l] is the fifth bit of value l of sub-block 2j / 2j + 1
            qh = torch.from_numpy(b[:, :, 16:48].copy()).to(torch.int32).view(n, k // per, 1, 1, 32)
            shift = torch.arange(8).view(4, 2, 1)
            codes = codes.to(torch.int32) | (((qh >> shift) & 1) << 4)
        scales = (d.unsqueeze(-1) * sc.float()).half().reshape(n, -1)
        mins = (-(dmin.unsqueeze(-1) * m.float())).half().reshape(n, -1)
        return pack(kind.lower(), codes.reshape(n, k).to(torch.uint8), scales, mins, bits)
    d = _f16(b[:, :, 0:2])  # [n, k/32]
    if kind == "Q8_0":
        q = torch.from_numpy(b[:, :, 2:].copy().view(np.int8)).to(torch.int16)
        codes, mins = (q + 128).to(torch.uint8), -128 * d
    else:
        lo = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[kind]
        qs = torch.from_numpy(b[:, :, lo:lo + 16].copy())  # [n, k/32, 16]
        codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # elements 0..15, 16..31
        if kind in ("Q5_0", "Q5_1"):
            codes = codes | (_high_bits(b[:, :, lo - 4:lo]).to(torch.uint8) << 4)
        mins = _f16(b[:, :, 2:4]) if kind in ("Q4_1", "Q5_1") else (-8 if kind == "Q4_0" else -16) * d
    return pack(kind.lower(), codes.reshape(n, k), d, mins, bits)


def widen(pw: PackedWeight) -> PackedWeight:
    """A 4-bit packed weight as the same values in the 8-bit layout (codes 0..15 in bytes): exact."""
    if pw.bits == 8:
        return pw
    sc, mn = row_params(pw)
    return pack(pw.fmt, codes_of(pw), sc, mn, 8)


def permute_rows(pw: PackedWeight, order: torch.Tensor) -> PackedWeight:
    """The same weight with its output rows reordered (exact: rows are whole groups)."""
    sc, mn = row_params(pw)
    return pack(pw.fmt, codes_of(pw)[order], sc[order], None if mn is None else mn[order], pw.bits)


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Weights with the same inputs stacked along the outputs (fused q/k/v, gate/up). Parts of 4- and 8-bit codes
    (a GGUF that keeps v in Q8_0, say) are fused in 8 bits, exactly; FP8 fuses only with FP8 of the same type."""
    first = parts[0]
    if any((p.fp8, p.group, p.k) != (first.fp8, first.group, first.k) for p in parts) or (
            first.fp8 and any(p.fmt != first.fmt for p in parts)):
        raise ValueError("cannot fuse weights of different formats or input sizes")
    bits = max(p.bits for p in parts)
    parts = [widen(p) if p.bits != bits else p for p in parts]
    fmt = first.fmt if all(p.fmt == first.fmt for p in parts) else "+".join(dict.fromkeys(p.fmt for p in parts))
    params = [row_params(p) for p in parts]
    mins = None if first.fp8 else torch.cat([mn for _, mn in params])
    return pack(fmt, torch.cat([codes_of(p) for p in parts]), torch.cat([sc for sc, _ in params]), mins, bits)
