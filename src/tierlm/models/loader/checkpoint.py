"""LoadedCheckpoint: what the loader hands the model: config, weights, tokenizer, and where they came from."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    weights_digest: a content digest of the weight files (32 hex chars, xxh3_128; see manifest.py): the
    digest of each *.safetensors file the weights were read from, files sorted by name, combined (for a
    single file, which covers every converted GGUF, it is that file's xxh3_128, i.e. `xxhsum -H2 FILE`).
    It depends on the files' bytes only (not paths, mtimes or the machine), so identical weights give the
    same digest everywhere and any changed byte gives another; key caches of computed state (e.g. KV
    blocks) on it. It covers the weights only, not config.json or the tokenizer. For a cache entry it
    comes from the entry's manifest, verified at load; for a Hugging Face directory it is computed at
    load (one chunked read of the weights, ~0.1 s per 0.5 GB from page cache).
    fp8_stored: for an FP8 checkpoint (loader/fp8_checkpoint.py), each FP8 weight's bytes and block scales as
    stored; `weights` holds their fp32 dequantization.
    table_files: a V4-mini's Engram table files (engram.safetensors), whose tensors `weights` maps in place.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    path: Path
    source: str
    weights_digest: str
    origin: Path | None = None
    fp8_stored: dict = field(default_factory=dict)
    table_files: tuple[Path, ...] = ()
