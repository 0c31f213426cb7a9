"""Model family -> model class, and `build_model`. Which architectures exist is the core registry's
business (tierlm.core.registry.ARCHITECTURES); each names the family whose class runs it."""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.core.errors import UnsupportedModelError
from tierlm.core.registry import architecture_names, get_architecture
from tierlm.models.base import CausalLM
from tierlm.models.linear import PackedLinear, QuantLinear, optimize_linears, use_packed
from tierlm.models.llama import LlamaForCausalLM
from tierlm.models.v4mini import V4MiniForCausalLM

MODEL_FAMILIES: dict[str, type] = {"llama": LlamaForCausalLM, "v4mini": V4MiniForCausalLM}


def model_class(architecture: str) -> type:
    arch = get_architecture(architecture)
    if arch is None or arch.family not in MODEL_FAMILIES:
        raise UnsupportedModelError(f"unsupported architecture {architecture!r}",
                                    f"tierlm supports {', '.join(architecture_names())}")
    return MODEL_FAMILIES[arch.family]


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str, max_positions: int | None = None, packed: dict | None = None,
                quant_activations: str = "int16") -> CausalLM:
    """Build the module on `meta` (no memory), then assign the loaded weights; `packed` (quantized weights by
    name, models/loader/quantized.py) replaces the linears and the embedding it holds, run with
    `quant_activations` ("int16" | "int8" | "fp32", see kernels/quant.py)."""
    cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = cls(cfg, max_positions)
    model.load_weights(weights, dtype, device, packed=packed)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.activations = quant_activations
    if use_packed(torch.device(device), dtype):
        optimize_linears(model)
        if getattr(model, "lm_head", False) is None:  # tied: a packed copy for the logits, the embedding stays
            model.lm_head = PackedLinear(model.embed_tokens.weight, None)
    return model.eval()
