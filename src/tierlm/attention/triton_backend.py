"""TritonBackend ("triton"): decode rows through the Triton paged-decode kernel (kernels/triton_attention.py),
which reads each row's K/V blocks in place (no gather) for fp32, bf16, fp16 and FP8 KV with their scales;
prefill chunks through the torch backend's gather + SDPA (the GPU's SDPA kernels run those).

Runs on CUDA, and on the CPU only under Triton's interpreter (TRITON_INTERPRET=1: the tests' way to check
the kernel against the torch backend without a GPU). Chosen by name (`--attention-backend triton`); "auto"
keeps the torch backend on CUDA until the device check has measured this one there.

Split-KV: rows * KV heads programs alone leave most of a GPU idle at small batches and long contexts, so
each row's table is split until about `programs_per_sm` programs per multiprocessor run (at least
`min_split_blocks` blocks each). The split count depends on shapes only (rows, heads, table width), so a
captured decode step keeps it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from tierlm.attention.backend import register_backend
from tierlm.attention.metadata import AttentionMetadata
from tierlm.attention.torch_backend import TorchPagedBackend, TorchStepState
from tierlm.core.registry import get_kv_format

if TYPE_CHECKING:
    from tierlm.kvcache.storage import LayerKV


def _kernels():
    """kernels.triton_attention, imported on first use (importing triton costs ~0.3 s at every start)."""
    from tierlm.kernels import triton_attention

    return triton_attention


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(TorchPagedBackend):
    name = "triton"
    summary = "Triton paged decode reading KV blocks in place (FP8 too), split-KV; prefill as torch (CUDA)"
    capturable = True  # tables and lengths read on the device; the grid depends on shapes only
    programs_per_sm = 4
    min_split_blocks = 4

    def __init__(self, target_programs: int | None = None):
        self._target = target_programs

    @classmethod
    def unsupported(cls, device, dtype, kv_format):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not _interpreted():
            return "it runs on CUDA (on the CPU only under TRITON_INTERPRET=1, for tests)"
        if device.type not in ("cpu", "cuda"):
            return f"it runs on CUDA, not {device.type}"
        fmt = get_kv_format(kv_format)
        if device.type == "cuda" and fmt.fp8 == "e4m3" and torch.cuda.get_device_capability(device) < (8, 9):
            return "FP8 e4m3 loads need compute capability 8.9 or newer (use e5m2 or an unscaled format)"
        return None

    def target_programs(self, device: torch.device) -> int:
        if self._target is None:
            if device.type == "cuda":
                sms = torch.cuda.get_device_properties(device).multi_processor_count
                self._target = self.programs_per_sm * sms
            else:
                self._target = 1  # the interpreter runs programs one by one; tests set their own
        return self._target

    @staticmethod
    def _prepare_decodes(meta: AttentionMetadata, num_blocks: int) -> TorchStepState:
        return TorchStepState()  # the kernel reads the tables and lengths as they are

    def decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        tk = _kernels()
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
        hkv = layer.data.shape[3]
        splits = tk.num_splits(q.shape[0], hkv, tables.shape[1], self.target_programs(q.device),
                               self.min_split_blocks)
        sch = layer.scheme
        if sch is None:
            kind, scales, group = tk.SCALES_NONE, None, 1
        elif sch.static:
            kind, scales, group = tk.SCALES_STATIC, layer.static_scales, 1
        else:
            kind = tk.SCALES_UE8M0 if sch.scale_type == "ue8m0" else tk.SCALES_FP32
            scales, group = layer.scales, layer.data.shape[-1] // layer.scales.shape[-1]
        return tk.paged_decode(q.contiguous(), layer.data, scales, kind, group, tables, lens, scale, splits)


register_backend(TritonBackend)
