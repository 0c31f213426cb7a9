"""FP8 numbers and their scale rules: the one definition every FP8 path (KV write, the attention backends'
reference dequantization, calibration) is tested against.

Types (torch dtypes, OCP FP8):
    e4m3   torch.float8_e4m3fn  max 448,    3 mantissa bits: precision, for K and V (the default)
    e5m2   torch.float8_e5m2    max 57344,  2 mantissa bits: range

A stored value is `fp8 * scale`. Scales are kept per token, per KV head, per group of `group` consecutive
values of the head (group None: one scale per token per head), or static: one per layer, K/V and head,
fixed by calibration (tierlm.quant.calibration). Scale types:
    fp32   scale = amax / fmax (amax of the group; the group's largest value lands on the format's max)
    ue8m0  a power of two, stored as one byte e (scale = 2^(e - 127)): amax / fmax rounded UP to the next
           power of two (DeepSeek's rule), so no value overflows and dequantization is an exponent add

Quantize: x / scale, clamped to +-fmax (torch's cast would turn overflow into NaN for e4m3fn), rounded to
nearest even by torch's cast. A group of zeros gets the smallest scale (its values are 0 whatever the scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.core.errors import InvalidParameterError

SCALE_TYPES = ("fp32", "ue8m0")
UE8M0_BIAS = 127
_MIN_EXP, _MAX_EXP = 1, 254  # 2^-126 (the smallest normal fp32) .. 2^127


@dataclass(frozen=True)
class Fp8Type:
    name: str
    dtype: torch.dtype
    max: float


FP8_TYPES: dict[str, Fp8Type] = {
    "e4m3": Fp8Type("e4m3", torch.float8_e4m3fn, 448.0),
    "e5m2": Fp8Type("e5m2", torch.float8_e5m2, 57344.0),
}


def fp8_type(name: str) -> Fp8Type:
    try:
        return FP8_TYPES[name]
    except KeyError:
        raise InvalidParameterError(f"unknown FP8 type {name!r}", f"use one of {', '.join(FP8_TYPES)}") from None


@dataclass(frozen=True)
class Fp8Scheme:
    """How a tensor of [..., H, D] values is quantized: FP8 type, scale granularity and scale type."""

    fp8: str = "e4m3"
    group: int | None = None  # values per scale within a head; None: one scale per head (per token)
    scale_type: str = "fp32"
    static: bool = False  # one fixed scale per (layer, K/V, head) from calibration; no per-token scales

    def __post_init__(self) -> None:
        fp8_type(self.fp8)
        if self.scale_type not in SCALE_TYPES:
            raise InvalidParameterError(f"unknown scale type {self.scale_type!r}", f"use one of {', '.join(SCALE_TYPES)}")
        if self.group is not None and self.group < 1:
            raise InvalidParameterError(f"scale group {self.group} < 1", "use 64, 128 or one scale per head")
        if self.static and (self.group is not None or self.scale_type != "fp32"):
            raise InvalidParameterError("static KV scales are fp32, one per head",
                                        "drop the group size and scale type from a static format")

    @property
    def type(self) -> Fp8Type:
        return fp8_type(self.fp8)

    def groups(self, head_dim: int) -> int:
        """Scales per token per head (0 for static scales, which are not stored per token)."""
        if self.static:
            return 0
        self.check(head_dim)
        return 1 if self.group is None else head_dim // self.group

    def check(self, head_dim: int) -> None:
        if self.group is not None and head_dim % self.group:
            raise InvalidParameterError(f"scale group {self.group} does not divide head_dim {head_dim}",
                                        f"use a group that divides {head_dim} (e.g. {head_dim}) or one scale per head")

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8 if self.scale_type == "ue8m0" else torch.float32


# ---- UE8M0 ------------------------------------------------------------------------------------------
def ue8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Positive fp32 scales -> the byte e of the smallest power of two >= scale (2^(e - 127))."""
    mant, exp = torch.frexp(scale.float())  # scale = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)  # an exact power of two keeps its exponent
    return (e + UE8M0_BIAS).clamp(_MIN_EXP, _MAX_EXP).to(torch.uint8)


def ue8m0_decode(e: torch.Tensor) -> torch.Tensor:
    """Bytes e (1..254, as ue8m0_encode writes them) -> 2^(e - 127): e is the fp32 exponent field."""
    return (e.to(torch.int32) << 23).view(torch.float32)


def decode_scales(scales: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """Stored scales (fp32 or UE8M0 bytes) -> fp32 values."""
    return ue8m0_decode(scales) if scheme.scale_type == "ue8m0" else scales.float()


# ---- quantize / dequantize --------------------------------------------------------------------------
def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def compute_scales(x: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """x: [..., H, D] -> stored scales [..., H, G] (fp32 values, or UE8M0 bytes) from each group's amax."""
    g = scheme.groups(x.shape[-1])
    amax = _grouped(x.float(), g).abs().amax(-1)
    scale = amax / scheme.type.max
    if scheme.scale_type == "ue8m0":
        return ue8m0_encode(scale.clamp_min(2.0 ** (_MIN_EXP - UE8M0_BIAS)))
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, scheme: Fp8Scheme, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., H, D] -> (FP8 data [..., H, D], stored scales). Dynamic schemes compute [..., H, G] scales
    from x; a static scheme takes `scales` [H] (fp32, per head) and returns them unchanged."""
    t = scheme.type
    if scheme.static:
        if scales is None:
            raise ValueError("a static FP8 scheme needs its calibrated scales")
        s = scales.float().reshape(*([1] * (x.dim() - 2)), -1, 1)  # broadcast over [..., H, D]
        data = (x.float() / s).clamp(-t.max, t.max).to(t.dtype)
        return data, scales
    stored = compute_scales(x, scheme)
    g = stored.shape[-1]
    s = decode_scales(stored, scheme).unsqueeze(-1)  # [..., H, G, 1]
    data = (_grouped(x.float(), g) / s).clamp(-t.max, t.max).to(t.dtype).reshape(x.shape)
    return data, stored


def _widen(data: torch.Tensor, scheme: Fp8Scheme, widen=None) -> torch.Tensor:
    """FP8 data (or its uint8 view) -> a new fp32 tensor of its values: torch's conversion, or `widen`
    (uint8 -> fp32 of the same shape, e.g. the native CPU kernel's, ~9x faster here)."""
    if widen is not None:
        x = widen(data if data.dtype == torch.uint8 else data.view(torch.uint8))
    else:
        x = (data.view(scheme.type.dtype) if data.dtype == torch.uint8 else data).float()
    return x.contiguous()  # the callers scale it in place through reshaped views


def dequantize(data: torch.Tensor, scales: torch.Tensor, scheme: Fp8Scheme, widen=None) -> torch.Tensor:
    """FP8 data [..., H, D] (or its uint8 view) and stored scales -> fp32 [..., H, D].
    Dynamic: scales [..., H, G]; static: scales [H]. `widen`: see _widen."""
    x = _widen(data, scheme, widen)
    if scheme.static:
        return x.mul_(scales.float().reshape(*([1] * (x.dim() - 2)), -1, 1))
    g = scales.shape[-1]
    _grouped(x, g).mul_(decode_scales(scales, scheme).unsqueeze(-1))
    return x


def widen_table(fp8: str) -> torch.Tensor:
    """fp32 value of every byte 0..255 in this FP8 type (what a lookup-table kernel would use)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_type(fp8).dtype).float()


# ---- paged KV: [2 (K, V), ..., H, D] -------------------------------------------------------------------
def quantize_kv(kv: torch.Tensor, scheme: Fp8Scheme, static_scales: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kv: [2, T, H, D] (K and V of T tokens) -> (FP8 data as uint8 [2, T, H, D], per-token scales
    [2, T, H, G] or None for a static scheme, which divides by static_scales [2, H])."""
    if scheme.static:
        if static_scales is None:
            raise ValueError("a static FP8 KV format needs its calibrated scales")
        t = scheme.type
        data = (kv.float() / static_scales.float()[:, None, :, None]).clamp(-t.max, t.max).to(t.dtype)
        return data.view(torch.uint8), None
    data, scales = quantize(kv, scheme)
    return data.view(torch.uint8), scales


def dequantize_kv_rows(data: torch.Tensor, scales: torch.Tensor | None, scheme: Fp8Scheme,
                       static_scales: torch.Tensor | None = None, is_v: torch.Tensor | None = None,
                       widen=None) -> torch.Tensor:
    """Gathered cache rows -> fp32. data [N, ..., H, D] (FP8 or uint8); per-token scales [N, ..., H, G];
    static: static_scales [2, H] and is_v [N] (bool: row n holds V, else K). `widen`: see _widen."""
    if scheme.static:
        s = static_scales.float()[is_v.long()]  # [N, H]
        return _widen(data, scheme, widen).mul_(s.reshape(s.shape[0], *([1] * (data.dim() - 3)), s.shape[1], 1))
    return dequantize(data, scales, scheme, widen)
