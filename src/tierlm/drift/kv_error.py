"""Per-layer K/V error of an FP8 candidate format, measured on the reference model's own K/V.

`KVErrorRecorder` wraps the reference engine's attention backend (as quant/calibration.AmaxRecorder does):
every K/V the reference writes passes through `write_kv`, where it is also sent through the candidate's
quantize -> dequantize round trip (tierlm.quant.fp8: the same functions LayerKV.write_slots / read_blocks
use), and per layer the squared error and the squared values are summed, K and V apart. The result per layer
is the relative RMS error sqrt(sum (x' - x)^2 / sum x^2) of K and of V (drift.metrics.relative_rms).
An unscaled candidate format (fp32, bf16, fp16) has no such round trip here: "n/a".
"""
from __future__ import annotations

import torch

from tierlm.drift.metrics import relative_rms
from tierlm.quant.fp8 import Fp8Scheme, dequantize_kv_rows, quantize_kv


def round_trip(kv: torch.Tensor, scheme: Fp8Scheme, static_scales: torch.Tensor | None = None) -> torch.Tensor:
    """kv [2, T, H, D] -> what a cache in `scheme` gives back for it, fp32 [2, T, H, D]."""
    data, scales = quantize_kv(kv, scheme, static_scales)  # data: uint8 [2, T, H, D]
    if scheme.static:
        is_v = torch.tensor([False, True], device=kv.device)
        return dequantize_kv_rows(data, None, scheme, static_scales, is_v)
    return dequantize_kv_rows(data, scales, scheme)


class KVErrorRecorder:
    """Wraps an attention backend; install with `engine.runner.backend = KVErrorRecorder(...)` and restore
    `recorder.inner` afterwards. static_scales: [L, 2, Hkv] for a static scheme, else None."""

    def __init__(self, inner, storage, scheme: Fp8Scheme, static_scales: torch.Tensor | None = None):
        self.inner = inner
        self.name, self.summary = inner.name, inner.summary
        self.scheme = scheme
        self.static_scales = static_scales
        self._index = {id(layer): i for i, layer in enumerate(storage.layers)}
        n = len(storage.layers)
        self.err_sq = torch.zeros(n, 2, dtype=torch.float64)  # [L, K/V]
        self.ref_sq = torch.zeros(n, 2, dtype=torch.float64)
        self.tokens = 0

    def prepare(self, meta, num_blocks):
        return self.inner.prepare(meta, num_blocks)

    def write_kv(self, layer, k, v, meta):
        i = self._index[id(layer)]
        kv = torch.stack((k.detach(), v.detach())).float()  # [2, T, Hkv, D]
        s = None if self.static_scales is None else self.static_scales[i].to(kv.device)
        back = round_trip(kv, self.scheme, s)
        x64, d64 = kv.double(), (back.double() - kv.double())
        self.err_sq[i] += d64.square().sum(dim=(1, 2, 3)).cpu()
        self.ref_sq[i] += x64.square().sum(dim=(1, 2, 3)).cpu()
        if i == 0:
            self.tokens += k.shape[0]
        return self.inner.write_kv(layer, k, v, meta)

    def attend(self, q, k, v, layer, meta, scale):
        return self.inner.attend(q, k, v, layer, meta, scale)

    def result(self) -> dict:
        """{"k": [per layer rel RMS], "v": [...], "tokens": n} over everything recorded."""
        rows = [[relative_rms(float(e), float(r)) for e, r in zip(err, ref)]
                for err, ref in zip(self.err_sq, self.ref_sq)]
        return {"k": [r[0] for r in rows], "v": [r[1] for r in rows], "tokens": self.tokens}
