"""Attention over the paged KV cache, behind one backend interface (backend.py). Metadata is explicit and
passed in; there is no global context. Backends: "cpu" (native decode kernel, mask-free prefill; the CPU
default) "torch" (gather + SDPA, any device; the reference) and "triton" (in-place paged decode on CUDA)."""
from tierlm.attention.backend import (
    BACKENDS,
    AttentionBackend,
    AttentionContext,
    register_backend,
    select_backend,
)
from tierlm.attention.cpu_backend import CpuBackend
from tierlm.attention.metadata import AttentionMetadata, kv_index
from tierlm.attention.torch_backend import TorchPagedBackend
from tierlm.attention.triton_backend import TritonBackend

__all__ = ["BACKENDS", "AttentionBackend", "AttentionContext", "AttentionMetadata", "CpuBackend",
           "TorchPagedBackend", "TritonBackend", "kv_index", "register_backend", "select_backend"]
