"""What the engine needs from a model: the CausalLM protocol the model runner depends on.

A model class is built on `meta` from a ModelConfig, gets its weights with `load_weights`, and then runs
steps over the paged KV cache through the AttentionContext it is handed (it never owns KV tensors and
never picks an attention implementation: the runner does both, once). models/registry.py maps each
architecture family (tierlm.core.registry.ARCHITECTURES) to the class that implements it.

    hidden = model(input_ids [T], positions [T], ctx: AttentionContext)   # [T, hidden], final norm applied
    logits = model.compute_logits(hidden[rows])                           # [N, vocab] fp32

Optional, for a model that reads more of a token's context than its id (models/v4mini.py): `token_context`
((earlier ids per token, conv tap offsets)), `begin_step(input_ids, history, tap_slots)` (called by the runner
before each forward), `add_kv_meta(storage)` (per-token state paged with the KV), `place_tables(backend, device)`
and `close()`. The same forward also runs with a models/dense.py DenseContext (training, reference passes).
"""
from __future__ import annotations

from typing import Protocol

import torch

from tierlm.attention import AttentionContext
from tierlm.config import ModelConfig


class CausalLM(Protocol):
    """Built as `cls(config, max_positions)` on the meta device (models.registry.build_model), so it must
    accept that; `embed_tokens` and an `lm_head` attribute (None when tied) let the registry swap in a
    packed output matrix and the bench count the bytes a step reads."""

    config: ModelConfig

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str,
                     packed: dict | None = None) -> None: ...
