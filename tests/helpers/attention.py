"""Dense causal attention: the reference every paged attention backend is compared with in the tests."""
from __future__ import annotations

import torch


def dense_reference(q, k, v, ctx, scale):
    """q: [Q, Hq, D] at positions ctx..ctx+Q-1; k, v: [L, Hkv, D] -> [Q, Hq, D] (causal, fp32)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q, k) * scale
    mask = torch.arange(k.shape[0])[None, :] <= (ctx + torch.arange(q.shape[0]))[:, None]
    return torch.einsum("hql,lhd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
