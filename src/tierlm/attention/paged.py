"""Paged attention in PyTorch: write new K/V into cache slots, then attend over each sequence's blocks.

Cache layout per layer: one tensor kv_cache: [2, num_blocks, block_size, Hkv, D] (K at 0, V at 1); one
index_select along dim 0 of its [2 * num_blocks, ...] view gathers a sequence's K and V blocks together.

Decode rows on CPU in fp32 go to a C kernel that reads the blocks in place (tierlm.kernels.cpu); elsewhere, and
wherever that kernel is unavailable, they take the gather + SDPA path below.

Grouped-query attention without repeating K/V: the G = Hq / Hkv query heads that share a KV head are
laid out as G extra query rows of that head, so SDPA sees q: [B, Hkv, G * Q, D] against k: [B, Hkv, L, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tierlm.attention.metadata import AttentionMetadata
from tierlm.kernels import cpu as cpu_kernels


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> cache slots slot_mapping: [T]."""
    _, nb, bs, h, d = kv_cache.shape
    kv_cache.view(2, nb * bs, h, d).index_copy_(1, slot_mapping, torch.stack((k, v)).to(kv_cache.dtype))


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] (the step's new tokens, decodes first) -> out: [T, Hq, D].

    The new tokens' K/V must already be written (write_kv) so that each query sees its own key.
    """
    T, hq, d = q.shape
    _, nb, bs, hkv, _ = kv_cache.shape
    blocks = kv_cache.view(2 * nb, bs, hkv, d)
    g = hq // hkv
    parts: list[torch.Tensor] = []  # each [rows, Hq, D], in row order; one part (the common case) is returned as is
    nd = meta.num_decodes
    if nd and cpu_kernels.usable(q, kv_cache):
        o = cpu_kernels.paged_decode(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)
        if o is not None:
            parts.append(o)
    if nd and not parts:
        # kv: [2 * Nd * MB, bs, Hkv, D] -> [2, Nd, MB * bs, Hkv, D] -> k, v: [Nd, Hkv, MB * bs, D]
        kv = blocks.index_select(0, meta.decode_kv_index).view(2, nd, -1, hkv, d).transpose(2, 3)
        k, v = kv[0], kv[1]
        qd = q[:nd].view(nd, hkv, g, d).to(k.dtype)  # [Nd, Hkv, G, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_key_mask, scale=scale)
        parts.append(o.reshape(nd, hq, d).to(q.dtype))
    row = nd
    for q_len, seq_len, index in zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_kv_indices):
        # kv: [2, L, Hkv, D] -> k, v: [1, Hkv, L, D];  qp: [q_len, Hq, D] -> [1, Hkv, G * q_len, D]
        kv = blocks.index_select(0, index).view(2, -1, hkv, d)[:, :seq_len].transpose(1, 2)
        k, v = kv[0].unsqueeze(0), kv[1].unsqueeze(0)
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
        parts.append(o.view(hkv, g, q_len, d).permute(2, 0, 1, 3).reshape(q_len, hq, d).to(q.dtype))
        row += q_len
    return parts[0] if len(parts) == 1 else torch.cat(parts)
