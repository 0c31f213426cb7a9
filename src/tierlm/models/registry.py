"""Architecture name -> model class. Every supported architecture maps to one class today."""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.core.errors import UnsupportedModelError
from tierlm.models.linear import PackedLinear, optimize_linears, use_packed
from tierlm.models.llama import LlamaForCausalLM

_REGISTRY = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "qwen3": LlamaForCausalLM}


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str, max_positions: int | None = None) -> LlamaForCausalLM:
    """Build the module on `meta` (no memory), then assign the loaded weights."""
    cls = _REGISTRY.get(cfg.architecture)
    if cls is None:
        raise UnsupportedModelError(f"unsupported architecture {cfg.architecture!r}",
                                    f"tierlm supports {', '.join(sorted(_REGISTRY))}")
    with torch.device("meta"):
        model = cls(cfg, max_positions)
    model.load_weights(weights, dtype, device)
    if use_packed(torch.device(device), dtype):
        optimize_linears(model)
        if model.lm_head is None:  # tied: a packed copy for the logits, the embedding stays for lookups
            model.lm_head = PackedLinear(model.embed_tokens.weight, None)
    return model.eval()
