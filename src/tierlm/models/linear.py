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

from tierlm.quant.weights import FP8_FORMATS as _FP8

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


class QuantLinear(nn.Module):
    """y = x W^T + b with W packed in a quantized format (tierlm.quant.weights). On the CPU it runs the native
    quantized matmul (kernels/quant.py; activations "int16" / "int8": rounded per 32 inputs, integer dot
    products; "fp32": exact up to summation order) for up to gemm_rows(pw) rows, and from there (prefill) the
    weight dequantized into a scratch buffer and one fp32 GEMM; elsewhere, or without the native kernels,
    fp32 activations times the dequantized weight. FP8 weights take fp32 activations on the CPU whatever
    `activations` says, and on a GPU with FP8 matmuls (compute capability 8.9+) run through torch._scaled_mm
    with activations rounded to e4m3 per 128 inputs (kernels/quant.py fp8_scaled_mm)."""

    def __init__(self, pw, bias: torch.Tensor | None = None, activations: str = "int16"):
        super().__init__()
        self.fmt, self.bits, self.group = pw.fmt, pw.bits, pw.group
        self.activations = activations  # "int16" | "int8" | "fp32": kernels/quant.py (a property)
        self.in_features, self.out_features = pw.k, pw.n
        # buffers, so .to(), state_dict() and memory accounting see the packed bytes; the fp16 scales and offsets
        # (FP8: fp32 scales) are kept as integer bit patterns, so a .to(dtype) of the model moves them without
        # converting them
        self.register_buffer("qdata", pw.data)
        self.register_buffer("qscales", pw.scales.view(torch.int32 if pw.fp8 else torch.int16))
        self.register_buffer("qmins", pw.mins.view(torch.int16))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.__dict__.get("_plan")
        if plan is not None and x.dtype is torch.float32 and x.device.type == "cpu" and x.is_contiguous():
            x2 = x.view(-1, self.in_features)
            if x2.shape[0] < plan.max_rows:  # decode: the integer kernel, arguments bound once (fast path)
                return plan.run(x2).view(*x.shape[:-1], self.out_features)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from tierlm.kernels import quant as qk

        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.float().contiguous()
        if x.device.type == "cuda" and self.fmt in _FP8 and _cuda_fp8(x.device):
            blocks = self.__dict__.get("_fp8_blocks")
            if blocks is None:
                blocks = self.__dict__["_fp8_blocks"] = qk.fp8_weight_blocks(self.pw)
            y = qk.fp8_scaled_mm(x2, blocks, bias)
        elif x.device.type == "cpu" and qk.qmatmul_usable():
            x2 = x2.float().contiguous()
            plan = self.plan()
            if x2.shape[0] < plan.max_rows:
                y = plan.run(x2)
            else:  # prefill: dequantize once, one fp32 GEMM
                y = qk.dequant_gemm(x2, self.pw, bias)
        else:
            y = qk.dequant_matmul(x2, self.pw, bias)
        return y.to(dtype).view(*lead, self.out_features)

    def plan(self):
        """The bound kernel arguments (kernels/quant.py QLinearPlan), or None off the native CPU path."""
        plan = self.__dict__.get("_plan")
        if plan is None and self.qdata.device.type == "cpu":
            from tierlm.kernels import quant as qk

            if qk.qmatmul_usable():
                bias = None if self.bias is None else self.bias.float().contiguous()
                plan = self.__dict__["_plan"] = qk.QLinearPlan(self.pw, bias, self.activations)
        return plan

    @property
    def activations(self) -> str:
        return self.__dict__["_activations"]

    @activations.setter
    def activations(self, mode: str) -> None:
        self.__dict__["_activations"] = mode
        self.__dict__.pop("_plan", None)  # the bound kernel arguments name the mode

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_plan", None)  # buffers may move: the bound pointers would be stale
        self.__dict__.pop("_fp8_blocks", None)
        return super()._apply(fn, recurse)

    @property
    def pw(self):
        """The packed weight over this module's buffers (wherever .to() has moved them)."""
        from tierlm.quant.weights import PackedWeight

        return PackedWeight(self.fmt, self.bits, self.group, self.out_features, self.in_features, self.qdata,
                            self.qscales.view(torch.float32 if self.fmt in _FP8 else torch.float16),
                            self.qmins.view(torch.float16))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt} (group {self.group})"


@functools.cache
def _cuda_fp8(device: torch.device) -> bool:
    """Whether torch._scaled_mm has FP8 on this GPU (compute capability 8.9: Ada, Hopper and later)."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quant_mlp(gate_up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """down(silu(gate) * up) in one native call when both are QuantLinear on the CPU path and x is a decode-sized
    fp32 batch; None otherwise (the caller runs the modules)."""
    if not (isinstance(gate_up, QuantLinear) and isinstance(down, QuantLinear)) or x.dtype is not torch.float32 \
            or x.device.type != "cpu":
        return None
    x2 = x.reshape(-1, gate_up.in_features)
    plans = gate_up.plan(), down.plan()
    if plans[0] is None or plans[1] is None or x2.shape[0] >= min(p.max_rows for p in plans):
        return None
    from tierlm.kernels.quant import mlp_run

    return mlp_run(plans[0], plans[1], x2.contiguous()).view(*x.shape[:-1], down.out_features)


class QuantEmbedding(nn.Module):
    """An embedding table in a quantized format: a lookup dequantizes only the rows it reads."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype  # the same module serves as the tied LM head
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from tierlm.kernels import quant as qk
        from tierlm.quant.weights import dequantize

        pw = self.table.pw
        flat = ids.reshape(-1).to(pw.data.device)
        rows = qk.dequantize_rows(pw, flat) if flat.device.type == "cpu" and qk.qmatmul_usable() else \
            dequantize(pw, rows=flat)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)
