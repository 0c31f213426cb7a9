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


def paged_step(storage, decode_lens, prefills, g, nb):
    """One step over a scrambled pool: decode rows (a context of L - 1 cached tokens, one new) then prefill
    chunks ((cached, new) pairs). Each sequence's cached context is written through the layer's write_slots
    (quantized for FP8, as an earlier step would have); its new tokens are left to the backend.
    Returns (meta, seqs, tables, full K, full V, query rows, new K, new V), the step's metadata not yet prepared."""
    from tierlm.attention import AttentionMetadata

    layer = storage[0]
    _, _, bs, hkv, d = layer.data.shape
    perm = torch.randperm(nb).tolist()  # scrambled physical blocks
    seqs = [(L - 1, 1) for L in decode_lens] + list(prefills)  # (cached context, new tokens)
    full_k, full_v, tables, q_rows, slots = [], [], [], [], []
    for ctx, n in seqs:
        L = ctx + n
        table = [perm.pop() for _ in range((L + bs - 1) // bs)]
        k, v = torch.randn(L, hkv, d), torch.randn(L, hkv, d)
        if ctx:
            layer.write_slots(torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)]), k[:ctx], v[:ctx])
        slots += [table[p // bs] * bs + p % bs for p in range(ctx, L)]
        full_k.append(k)
        full_v.append(v)
        tables.append(table)
        q_rows.append(torch.randn(n, hkv * g, d))
    nd = len(decode_lens)
    mb = max((len(t) for t in tables[:nd]), default=0)
    meta = AttentionMetadata(
        block_size=bs, slot_mapping=torch.tensor(slots), num_decodes=nd,
        decode_block_tables=torch.tensor([t + [0] * (mb - len(t)) for t in tables[:nd]]) if nd else None,
        decode_seq_lens=torch.tensor(decode_lens) if nd else None,
        prefill_query_lens=[n for _, n in prefills], prefill_seq_lens=[c + n for c, n in prefills],
        prefill_block_tables=[torch.tensor(t) for t in tables[nd:]])
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    return meta, seqs, tables, full_k, full_v, q_rows, new_k, new_v
