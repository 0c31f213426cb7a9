"""Paged attention in PyTorch: write new K/V into cache slots, then attend over each sequence's blocks.

Cache layout per layer: k_cache, v_cache: [num_blocks, block_size, Hkv, D].

Grouped-query attention without repeating K/V: the G = Hq / Hkv query heads that share a KV head are
laid out as G extra query rows of that head, so SDPA sees q: [B, Hkv, G * Q, D] against k: [B, Hkv, L, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tierlm.attention.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> cache slots slot_mapping: [T]."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens: [length, Hkv, D]."""
    nb, bs, h, d = cache.shape
    return cache.index_select(0, block_table).view(-1, h, d)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] (the step's new tokens, decodes first) -> out: [T, Hq, D].

    The new tokens' K/V must already be written (write_kv) so that each query sees its own key.
    """
    T, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        bt = meta.decode_block_tables  # [Nd, MB]
        nbk, bs = bt.shape[1], k_cache.shape[1]
        # k, v: [Nd, MB*bs, Hkv, D] -> [Nd, Hkv, L, D]
        k = k_cache.index_select(0, bt.reshape(-1)).view(nd, nbk * bs, hkv, d).transpose(1, 2)
        v = v_cache.index_select(0, bt.reshape(-1)).view(nd, nbk * bs, hkv, d).transpose(1, 2)
        qd = q[:nd].view(nd, hkv, g, d).to(k.dtype)  # [Nd, Hkv, G, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_key_mask, scale=scale)
        out[:nd] = o.reshape(nd, hq, d).to(q.dtype)
    row = nd
    for q_len, seq_len, table in zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_block_tables):
        # k, v: [L, Hkv, D] -> [1, Hkv, L, D];  qp: [q_len, Hq, D] -> [1, Hkv, G * q_len, D]
        k = _gather(k_cache, table, seq_len).transpose(0, 1).unsqueeze(0)
        v = _gather(v_cache, table, seq_len).transpose(0, 1).unsqueeze(0)
        qp = q[row:row + q_len].view(q_len, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * q_len, d)
        qp = qp.to(k.dtype)
        ctx = seq_len - q_len
        if ctx == 0 and g == 1:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale)
        else:
            # query i (absolute position ctx + i) sees keys 0..ctx + i; repeated for the G head rows.
            qpos = torch.arange(ctx, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]  # [q_len, L]
            mask = mask.repeat(g, 1)  # [G * q_len, L]
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)
        # o: [1, Hkv, G * q_len, D] -> [q_len, Hq, D]
        out[row:row + q_len] = o.view(hkv, g, q_len, d).permute(2, 0, 1, 3).reshape(q_len, hq, d).to(q.dtype)
        row += q_len
    return out
