"""LoadedCheckpoint: what the loader hands the model: config, weights, tokenizer, and where they came from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.models.loader.tokenizer import Tokenizer


@dataclass
class LoadedCheckpoint:
    """A model ready to build.

    weights: Hugging Face Llama names (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight,
    ..., model.norm.weight, lm_head.weight only when embeddings are not tied), memory-mapped from
    safetensors, in the stored dtype (fp32 for converted GGUFs). All use one ("rotate_half") RoPE layout.
    path: the Hugging Face-layout directory the weights and tokenizer files were read from (the model
    directory, or the converted copy in the cache for a GGUF).
    source: "gguf-cache" (a converted GGUF, read from the cache) or "hf" (a Hugging Face directory).
    origin: what the user pointed at (the .gguf file or the model directory).
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    path: Path
    source: str
    origin: Path | None = None
