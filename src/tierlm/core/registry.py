"""The one registry of names the engine accepts: model architectures, compute dtypes and KV formats.

Pure data, no torch import at module level: the command line, the config validation, the loader, the
model registry, the KV spec and `tierlm info` all read these tables, so adding an architecture, a dtype
or a KV format is one entry here (plus the code that runs it, registered where it lives).

    ARCHITECTURES  model_type -> Architecture (Hugging Face class name, GGUF name, model family)
    DTYPES         name -> DType (torch dtype attribute, bytes per element)
    KV_FORMATS     name -> KVFormat (element bytes, scales, storage dtype, implemented or planned)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tierlm.core.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch


# ---- architectures ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """A model_type tierlm can run.

    `family` names the model class that runs it (models/registry.py maps families to classes);
    `hf_class` is config.json's `architectures[0]`; `gguf_name` is the GGUF `general.architecture`
    value (None: not loadable from GGUF); `permuted_qk`: the GGUF converter permuted Q/K rows for
    adjacent-pair RoPE, so the loader un-permutes them.
    """

    name: str
    family: str
    hf_class: str
    gguf_name: str | None = None
    permuted_qk: bool = False


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", "llama", "LlamaForCausalLM", gguf_name="llama", permuted_qk=True),
    Architecture("mistral", "llama", "MistralForCausalLM"),
    Architecture("qwen2", "llama", "Qwen2ForCausalLM", gguf_name="qwen2"),
    Architecture("qwen3", "llama", "Qwen3ForCausalLM", gguf_name="qwen3"),
    Architecture("v4mini", "v4mini", "V4MiniForCausalLM"),  # tierlm's own: Llama blocks + Engram (models/v4mini.py)
)}


def architecture_names() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


def gguf_architecture_names() -> tuple[str, ...]:
    return tuple(a.gguf_name for a in ARCHITECTURES.values() if a.gguf_name)


def get_architecture(name: str) -> Architecture | None:
    """The registry entry for a config.json model_type, or None when tierlm cannot run it."""
    return ARCHITECTURES.get(name)


# ---- compute dtypes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DType:
    name: str  # what the command line and configs say
    torch_name: str  # attribute of the torch module

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # deferred: parsing flags should not import torch

        return getattr(torch, self.torch_name)


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("fp32", "float32"),
    DType("bf16", "bfloat16"),
    DType("fp16", "float16"),
)}
DTYPE_CHOICES = ("auto", *DTYPES)  # "auto": bf16 on CUDA, fp32 on CPU (no native bf16 there)
# Weight formats of --quantization (defined in tierlm.quant.weights, which checks it holds exactly these; named
# here so flags and config validation need no torch import)
WEIGHT_FORMAT_NAMES = ("q4_0", "q4_1", "q8_0", "int4", "int8", "fp8", "fp8_ue8m0")
# --quantization values: a weight format, or "gguf" (each tensor in the block format its GGUF stores)
QUANTIZATION_CHOICES = ("none", *WEIGHT_FORMAT_NAMES, "gguf")
QUANT_ACTIVATIONS = ("int16", "int8", "fp32")


def get_dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidParameterError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(torch_dtype: torch.dtype) -> str:
    """The registry name of a torch dtype ('fp32' for torch.float32)."""
    for d in DTYPES.values():
        if d.torch_dtype == torch_dtype:
            return d.name
    raise InvalidParameterError(f"dtype {torch_dtype} is not a tierlm compute dtype", f"use one of {', '.join(DTYPES)}")


# ---- KV formats ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVFormat:
    """How one KV element is stored.

    Unscaled formats (fp32, bf16, fp16) store values as they are. FP8 formats (`fp8` = "e4m3" or "e5m2")
    store one byte per value plus scales (tierlm.quant.fp8): per token and KV head, one scale per
    `scale_group` values (0: one per head) of `scale_bytes` bytes (4: fp32, 1: UE8M0); a `static` format
    stores no per-token scales (one calibrated fp32 scale per layer, K/V and head, held outside the blocks).
    `storage` is the torch dtype attribute the device cache is allocated in. `implemented=False` marks a
    planned format: its sizes are known but no kernel reads or writes it yet, so asking for its torch
    dtype raises.
    """

    name: str
    element_bytes: int
    storage: str
    scale_bytes: int = 0
    scale_group: int = 0  # values per scale; 0 with scale_bytes > 0: one scale per head
    implemented: bool = True
    fp8: str = ""  # "e4m3" | "e5m2" for FP8 formats
    static: bool = False

    @property
    def scaled(self) -> bool:
        return bool(self.fp8)

    def scales_per_head(self, head_dim: int) -> int:
        if not self.scale_bytes:
            return 0
        return math.ceil(head_dim / self.scale_group) if self.scale_group else 1

    def bytes_per_head(self, head_dim: int) -> int:
        """Bytes for one head's K (or V) vector of `head_dim` values, per-token scales included."""
        return head_dim * self.element_bytes + self.scales_per_head(head_dim) * self.scale_bytes

    def check_head_dim(self, head_dim: int) -> None:
        """InvalidParameterError when the scale group does not divide head_dim (groups never span heads)."""
        if self.scale_group and head_dim % self.scale_group:
            raise InvalidParameterError(
                f"KV format {self.name}: scale group {self.scale_group} does not divide head_dim {head_dim}",
                f"use a format whose group divides {head_dim}, or {self.name.split('_g')[0]} (one scale per head)")

    def scheme(self):
        """The tierlm.quant.fp8.Fp8Scheme of an FP8 format (None for unscaled formats)."""
        if not self.fp8:
            return None
        from tierlm.quant.fp8 import Fp8Scheme

        return Fp8Scheme(fp8=self.fp8, group=self.scale_group or None,
                         scale_type="ue8m0" if self.scale_bytes == 1 else "fp32", static=self.static)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the device cache is allocated in. Raises for planned (unimplemented) formats."""
        if not self.implemented:
            raise InvalidParameterError(
                f"KV format {self.name!r} is planned but not implemented yet",
                f"use one of {', '.join(implemented_kv_formats())}",
            )
        import torch

        return getattr(torch, self.storage)


def _fp8_formats() -> list[KVFormat]:
    """fp8_<type>[_g<G>][_ue8m0] and fp8_<type>_static, for e4m3 and e5m2:
        fp8_e4m3             per token and head, one fp32 scale (+4 bytes per head)
        fp8_e4m3_ue8m0       per token and head, one power-of-two scale byte (+1)
        fp8_e4m3_g64         per token, one fp32 scale per 64 values (+4 per 64)
        fp8_e4m3_g64_ue8m0   ... UE8M0 (+1 per 64); g128 likewise
        fp8_e4m3_static      one calibrated fp32 scale per layer, K/V and head (+0 per token)"""
    out = []
    for t, storage in (("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2")):
        for group in (0, 64, 128):
            for scale_bytes, suffix in ((4, ""), (1, "_ue8m0")):
                name = f"fp8_{t}" + (f"_g{group}" if group else "") + suffix
                out.append(KVFormat(name, 1, storage, scale_bytes=scale_bytes, scale_group=group, fp8=t))
        out.append(KVFormat(f"fp8_{t}_static", 1, storage, fp8=t, static=True))
    return out


KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("fp32", 4, "float32"),
    KVFormat("bf16", 2, "bfloat16"),
    KVFormat("fp16", 2, "float16"),
    *_fp8_formats(),
)}


def implemented_kv_formats() -> tuple[str, ...]:
    """Names of the formats the engine can run today, in registry order."""
    return tuple(name for name, f in KV_FORMATS.items() if f.implemented)


def get_kv_format(name: str) -> KVFormat:
    """The registry entry for `name`; InvalidParameterError naming the known formats if absent."""
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise InvalidParameterError(f"unknown KV format {name!r}", f"use one of {', '.join(KV_FORMATS)}") from None
