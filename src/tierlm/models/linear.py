"""Runtime swap of nn.Linear for faster CPU kernels, behind one function: `optimize_linears(model)`.

On CPU in fp32, torch's default linear goes to MKL sgemm, which is slow for the skinny shapes of
decoding (M = batch). oneDNN with the weight reordered once into its blocked layout runs the same
fp32 product 2-4x faster here (measured for M from 1 to 512 on the 2-core reference box). The swap is
numerically an fp32 matmul with a different summation order; it is used only where the op exists and
passes a self-check, otherwise the model keeps nn.Linear (logged once).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
BATCH_HINT = 64  # oneDNN picks its blocking for this M; measured best across M = 1..512 here


@functools.cache
def onednn_linear_available() -> bool:
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        ok = torch.allclose(y, F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError) as e:
        log.info("oneDNN packed linear unavailable (%s); using torch's default linear", e)
        return False
    if not ok:
        log.warning("oneDNN packed linear failed its self-check; using torch's default linear")
    return ok


class PackedLinear(nn.Module):
    """y = x W^T + b with W stored once in oneDNN's blocked layout (CPU, fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                              "none", [], "")
        return y.view(*lead, self.out_features)


def use_packed(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and onednn_linear_available()


def optimize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, PackedLinear(child.weight, child.bias))
                swapped += 1
    return swapped
