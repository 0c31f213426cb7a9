"""Dense causal attention over whole sequences, for training and as the reference forward pass.

A `DenseContext` stands where the engine passes an AttentionContext: the model's layers call
`ctx.forward(layer, q, k, v, scale)` on the step's flattened tokens, here B sequences of T tokens each
(row b * T + t is token t of sequence b), and attention is causal within each sequence, with no KV cache.
The same modules therefore train (autograd flows through) and serve (paged KV), so a trained checkpoint is
exactly what the engine runs.

    hidden = dense_forward(model, ids)        # ids [B, T] -> hidden [B, T, hidden], final norm applied
    logits = model.compute_logits(hidden)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DenseContext:
    batch: int
    seq_len: int

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B*T, Hq, D], k/v [B*T, Hkv, D] -> [B*T, Hq, D], causal per sequence (grouped-query heads shared)."""
        B, T = self.batch, self.seq_len
        q, k, v = (x.reshape(B, T, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return o.transpose(1, 2).reshape(B * T, o.shape[1], o.shape[3])


def dense_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] (each row a sequence from position 0) -> hidden states [B, T, hidden]."""
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device).repeat(B)
    return model(ids.reshape(-1), positions, DenseContext(B, T)).view(B, T, -1)
