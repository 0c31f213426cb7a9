"""paged_attention against dense causal attention on scrambled block tables (decodes + prefill chunks),
through both decode paths: the native CPU kernel and gather + SDPA."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierlm.attention import AttentionMetadata, paged_attention, write_kv
from tierlm.kernels import cpu as cpu_kernels


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "usable", lambda *t: False)
    elif not cpu_kernels.usable(torch.zeros(1)):
        pytest.skip("native CPU kernels unavailable here (no C compiler)")
    return request.param


def dense_reference(q, k, v, ctx, scale):
    """q: [Q, Hq, D] at positions ctx..ctx+Q-1; k, v: [L, Hkv, D] -> [Q, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q, k) * scale
    L = k.shape[0]
    mask = torch.arange(L)[None, :] <= (ctx + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path fixture holds for all examples
@given(decode_lens=st.lists(st.integers(1, 40), max_size=4),
       prefills=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 20)), max_size=3),
       hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 3]), seed=st.integers(0, 1000))
def test_matches_dense(decode_path, decode_lens, prefills, hkv, g, seed):
    if not decode_lens and not prefills:
        return
    torch.manual_seed(seed)
    bs, d, nb = 4, 8, 64
    cache = torch.zeros(2, nb, bs, hkv, d)
    perm = torch.randperm(nb).tolist()  # scrambled physical blocks
    seqs = [(L - 1, 1) for L in decode_lens] + list(prefills)  # (cached context, new tokens)
    full_k, full_v, tables, q_rows, slots = [], [], [], [], []
    for ctx, n in seqs:
        L = ctx + n
        table = [perm.pop() for _ in range((L + bs - 1) // bs)]
        k, v = torch.randn(L, hkv, d), torch.randn(L, hkv, d)
        # the cached context is already in the cache; the new tokens are written by write_kv
        for p in range(ctx):
            cache[0, table[p // bs], p % bs], cache[1, table[p // bs], p % bs] = k[p], v[p]
        slots += [table[p // bs] * bs + p % bs for p in range(ctx, L)]
        full_k.append(k)
        full_v.append(v)
        tables.append(table)
        q_rows.append(torch.randn(n, hkv * g, d))
    nd = len(decode_lens)
    mb = max((len(t) for t in tables[:nd]), default=0)
    dec_bt = torch.tensor([t + [0] * (mb - len(t)) for t in tables[:nd]]) if nd else None
    dec_lens = torch.tensor(decode_lens) if nd else None
    mask = (torch.arange(mb * bs)[None, :] < dec_lens[:, None]).view(nd, 1, 1, -1) if nd else None
    meta = AttentionMetadata(
        block_size=bs, slot_mapping=torch.tensor(slots), num_decodes=nd, decode_block_tables=dec_bt,
        decode_kv_index=AttentionMetadata.kv_index(dec_bt, nb) if nd else None,
        decode_seq_lens=dec_lens, decode_key_mask=mask,
        prefill_query_lens=[n for _, n in prefills], prefill_seq_lens=[c + n for c, n in prefills],
        prefill_block_tables=[torch.tensor(t) for t in tables[nd:]],
        prefill_kv_indices=[AttentionMetadata.kv_index(torch.tensor(t), nb) for t in tables[nd:]])
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    write_kv(cache, new_k, new_v, meta.slot_mapping)
    q = torch.cat(q_rows)
    out = paged_attention(q, cache, meta, scale=d ** -0.5)
    ref = torch.cat([dense_reference(qr, k, v, c, d ** -0.5) for qr, k, v, (c, _) in zip(q_rows, full_k, full_v, seqs)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
