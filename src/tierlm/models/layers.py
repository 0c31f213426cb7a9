"""Building blocks shared by the Llama family: RMSNorm and rotary position embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.kernels import cpu as cpu_kernels


class RMSNorm(nn.Module):
    """RMSNorm; with a residual, the pre-norm block's add comes first and is returned too:
    norm(x, residual) -> (rms_norm(x + residual), x + residual). CPU fp32 uses the fused native kernel."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                            or (residual is not None and residual.requires_grad))
        if not grad and cpu_kernels.usable(x, self.weight):  # the native kernel has no backward: training uses torch
            out, res = cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, res)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3 style frequency scaling when configured.
    rope_type "freq_factors" (GGUF rope_freqs) divides each frequency by its own factor: inv / factors."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "freq_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float64)
        if factors.shape != inv.shape:
            from tierlm.core.errors import CorruptModelError

            raise CorruptModelError(f"rope_scaling has {factors.numel()} frequency factors, expected {inv.numel()} "
                                    f"(head_dim {head_dim} / 2)", "re-convert the model or fix its config.json")
        return (inv / factors).float()
    if kind == "llama3":
        factor = scaling["factor"]
        lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        mid = (wavelen <= lo_wavelen) & (wavelen >= hi_wavelen)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()
    from tierlm.core.errors import UnsupportedModelError

    raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r}",
                                "use a model with default, linear, llama3 or freq_factors RoPE")


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate_half") RoPE. Tables are precomputed for max_positions in the form the rotation
    uses directly: cos = [cos, cos] and sin = [-sin, sin] over the head dim, so that
    rope(x) = x * cos + swap_halves(x) * sin (see apply_rope), four ops per call."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # [P, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)  # [P, D]
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)  # [P, D]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, sin): [T, 1, D] each, computed once per step and shared by all layers."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] rotated by position (half-split layout): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
    written as x * [cos, cos] + [x2, x1] * [-sin, sin] with the tables from RotaryEmbedding (computed in fp32)."""
    dtype = x.dtype
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((x2, x1), dim=-1) * sin).to(dtype)
