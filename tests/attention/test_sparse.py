"""Sparse decoding with the Quest selector (attention/sparse.py): per-block key bounds follow the stored keys
through chunked writes and block reuse; block scores and picks equal a brute-force oracle's; a budget that
covers the context reads every block (equal to dense, exactly); a compacted decode equals dense attention
restricted to the picked blocks on both backends, FP8 included; and on the default model, sparse decoding
within the budget gives dense's greedy tokens while a small budget stays batch invariant."""
from __future__ import annotations

import math

import pytest
import torch
from helpers.attention import dense_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from tierlm.attention import AttentionContext, AttentionMetadata, select_backend
from tierlm.attention.sparse import QuestSelector, add_quest_meta, quest_scores, update_key_bounds
from tierlm.config import ModelConfig, SparseConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.kvcache import KVSpec, KVStorage

CPU = torch.device("cpu")
BS = 4


def storage(kv_format="fp32", hkv=2, d=8, nb=64):
    cfg = ModelConfig("llama", 32, hkv * 2 * d, 64, 1, hkv * 2, hkv, d, 4096)
    s = KVStorage(KVSpec.from_model(cfg, kv_format, BS), nb, CPU)
    add_quest_meta(s)
    return s


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 23), min_size=1, max_size=3), chunk=st.integers(1, 9), seed=st.integers(0, 99),
       sync_free=st.booleans())
def test_key_bounds_are_the_min_and_max_of_each_blocks_stored_keys(lens, chunk, seed, sync_free):
    """Both ways of starting a block afresh (picked out on the CPU; rewritten in place, sync-free, on a GPU and in a
    captured step) keep the same bounds."""
    torch.manual_seed(seed)
    s = storage()
    layer = s[0]
    layer.block_meta["key_min"].fill_(-1e9)  # stale bounds of a previous owner must not survive
    layer.block_meta["key_max"].fill_(1e9)
    perm = torch.randperm(s.num_blocks)
    tables, next_block = [], 0
    for n in lens:
        nb = -(-n // BS)
        tables.append(perm[next_block:next_block + nb])
        next_block += nb
    keys = [torch.randn(n, 2, 8) for n in lens]
    for table, k in zip(tables, keys):
        for a in range(0, len(k), chunk):  # written chunk by chunk, as prefill chunks and decodes do
            pos = torch.arange(a, min(a + chunk, len(k)))
            slots = table[pos // BS] * BS + pos % BS
            stored, _ = layer.write_slots(slots, k[pos], k[pos])
            update_key_bounds(layer, slots, stored, BS, sync_free)
    for table, k in zip(tables, keys):
        for j, b in enumerate(table.tolist()):
            kb = k[j * BS:(j + 1) * BS]
            assert torch.equal(layer.block_meta["key_min"][b], kb.amin(0))
            assert torch.equal(layer.block_meta["key_max"][b], kb.amax(0))


def brute_scores(q, lo, hi):
    """The Quest bound by loops: u[n, j, h] = sum_c max(q[n,h,c] * lo[n,j,kvh,c], q[n,h,c] * hi[n,j,kvh,c])."""
    n, hq, d = q.shape
    mb, hkv = lo.shape[1], lo.shape[2]
    out = torch.zeros(n, mb, hq)
    for a in range(n):
        for j in range(mb):
            for h in range(hq):
                kv = h // (hq // hkv)
                out[a, j, h] = sum(max(float(q[a, h, c] * lo[a, j, kv, c]), float(q[a, h, c] * hi[a, j, kv, c]))
                                   for c in range(d))
    return out


def test_scores_equal_the_oracle_and_bound_every_keys_logit():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8)
    keys = torch.randn(2, 5, BS, 2, 8)  # [N, MB, bs, Hkv, D]
    lo, hi = keys.amin(2), keys.amax(2)
    u = quest_scores(q, lo, hi)
    torch.testing.assert_close(u, brute_scores(q, lo, hi), rtol=1e-5, atol=1e-5)
    logits = torch.einsum("nhd,njthd->njth", q, keys.repeat_interleave(2, dim=3))  # every key's logit
    assert (logits.amax(2) <= u + 1e-5).all()


def oracle_picks(q, lo, hi, nblocks, sink, window, budget, scale):
    """Block positions a brute-force search keeps: sink and window, then the candidates with the largest
    log sum over heads of exp(scale * (bound - that head's best candidate bound)), ties to the earlier block."""
    u = brute_scores(q.unsqueeze(0), lo.unsqueeze(0), hi.unsqueeze(0))[0]  # [MB, Hq]
    keep = {j for j in range(nblocks) if j < sink or j >= nblocks - window}
    cand = [j for j in range(nblocks) if j not in keep]
    if nblocks <= budget:
        return list(range(nblocks))
    best = [max(float(u[j, h]) for j in cand) for h in range(u.shape[1])]
    rel = {j: math.log(sum(math.exp(scale * (float(u[j, h]) - best[h])) for h in range(u.shape[1])))
           for j in cand}
    chosen = sorted(cand, key=lambda j: (-rel[j], j))[: budget - len(keep)]
    return sorted(keep | set(chosen))


@settings(max_examples=30, deadline=None)
@given(lens=st.lists(st.integers(1, 60), min_size=1, max_size=4), budget=st.sampled_from([12, 16, 24, 40]),
       seed=st.integers(0, 999))
def test_picks_equal_the_oracle_and_keep_sink_window_and_the_last_partial_block(lens, budget, seed):
    torch.manual_seed(seed)
    s = storage()
    layer = s[0]
    sel = QuestSelector(SparseConfig(selector="quest", budget_tokens=budget, sink_tokens=4, window_tokens=8), BS)
    mb = max(-(-n // BS) for n in lens)
    perm = torch.randperm(s.num_blocks)[: len(lens) * mb].view(len(lens), mb)
    layer.block_meta["key_min"].copy_(torch.randn(s.num_blocks, 2, 8))
    layer.block_meta["key_max"].copy_(layer.block_meta["key_min"] + torch.rand(s.num_blocks, 2, 8) * 2)
    q = torch.randn(len(lens), 4, 8)
    picks = sel.select(q, layer, perm, torch.tensor(lens), 0.35)
    static = sel.select(q, layer, perm, torch.tensor(lens), 0.35, static=True)  # a captured step's (and any GPU's)
    assert static.block_tables.shape[1] == min(mb, sel.budget_blocks) and torch.equal(static.seq_lens, picks.seq_lens)
    for i, n in enumerate(lens):
        w = -(-int(picks.seq_lens[i]) // BS)
        assert torch.equal(static.block_tables[i, :w], picks.block_tables[i, :w])
        nb = -(-n // BS)
        want = oracle_picks(q[i], layer.block_meta["key_min"][perm[i]], layer.block_meta["key_max"][perm[i]], nb,
                            sel.sink_blocks, sel.window_blocks, sel.budget_blocks, 0.35)
        got_len = int(picks.seq_lens[i])
        got = picks.block_tables[i, : -(-got_len // BS)].tolist()
        assert got == perm[i, want].tolist(), (i, n)
        assert got_len == (len(want) - 1) * BS + (n - (nb - 1) * BS)  # the last block keeps its fill


def test_bad_budgets_name_the_fix():
    with pytest.raises(InvalidParameterError, match="sparse-budget"):
        SparseConfig(selector="quest", budget_tokens=32, sink_tokens=16, window_tokens=64)
    with pytest.raises(InvalidParameterError, match="sparse-budget"):
        QuestSelector(SparseConfig(selector="quest", budget_tokens=70, sink_tokens=1, window_tokens=64), 16)
    with pytest.raises(InvalidParameterError, match="selector"):
        SparseConfig(selector="nsa")


# ---- attention over the picks -----------------------------------------------------------------------------
def run_decodes(backend_name, kv_format, lens, budget, seed, hkv=2, g=2, d=8):
    """Decode rows over random contexts with the selector at `budget` (None: dense); returns (out, picks,
    per-sequence stored K/V in position order, q)."""
    torch.manual_seed(seed)
    s = storage(kv_format, hkv, d)
    backend = select_backend(backend_name, CPU, torch.float32, kv_format)
    mb = max(-(-n // BS) for n in lens)
    tables = torch.randperm(s.num_blocks)[: len(lens) * mb].view(len(lens), mb)
    ks, vs = [], []
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[i, pos // BS] * BS + pos % BS
        k, v = s[0].write_slots(slots, torch.randn(n, hkv, d) * 2, torch.randn(n, hkv, d))
        update_key_bounds(s[0], slots, k, BS)
        ks.append(k)
        vs.append(v)
    q = torch.randn(len(lens), hkv * g, d)
    lens_t = torch.tensor(lens)
    # the decode rows' own token is the last of each context: it is already in the cache (write_kv ran)
    meta = AttentionMetadata(block_size=BS, slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens_t)
    backend.prepare(meta, s.num_blocks)
    sel = None if budget is None else QuestSelector(
        SparseConfig(selector="quest", budget_tokens=budget, sink_tokens=4, window_tokens=8, dense_layers=0), BS)
    picks = None
    if sel is not None:
        picks = sel.select(q, s[0], tables, lens_t, d ** -0.5)
        if picks.block_tables is not tables:
            meta = backend.with_decode_tables(meta, picks.block_tables, picks.seq_lens, s.num_blocks)
    out = backend.attend(q, None, None, s[0], meta, d ** -0.5)
    return out, picks, tables, ks, vs, q


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kv_format", ["fp32", "fp8_e4m3"])
def test_a_budget_covering_the_context_is_dense_exactly(backend, kv_format):
    lens = [5, 37, 60]
    dense, *_ = run_decodes(backend, kv_format, lens, None, 3)
    sparse, picks, tables, *_ = run_decodes(backend, kv_format, lens, 64, 3)
    assert picks.block_tables is tables and torch.equal(sparse, dense)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kv_format", ["fp32", "fp8_e4m3"])
def test_a_compacted_decode_is_dense_attention_over_the_picked_blocks(backend, kv_format):
    lens = [9, 37, 61, 64]
    out, picks, tables, ks, vs, q = run_decodes(backend, kv_format, lens, 24, 5)
    for i, n in enumerate(lens):
        nb = -(-n // BS)
        kept = picks.block_tables[i, : -(-int(picks.seq_lens[i]) // BS)].tolist()
        pos = [j for j in range(nb) if int(tables[i, j]) in kept]  # picked block positions
        assert len(kept) == min(nb, 6) and pos[-1] == nb - 1 and (nb <= 6 or pos[0] == 0)
        rows = torch.cat([torch.arange(j * BS, min((j + 1) * BS, n)) for j in pos])
        ref = dense_reference(q[i:i + 1], ks[i][rows], vs[i][rows], len(rows) - 1, 8 ** -0.5)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=2e-5, atol=2e-5)


def test_the_first_layers_stay_dense():
    sel = QuestSelector(SparseConfig(selector="quest", budget_tokens=128, dense_layers=2), 16)
    assert not sel.applies(0) and not sel.applies(1) and sel.applies(2)


# ---- the default model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def passages_and_dense():
    from tierlm import LLM, SamplingParams
    from tierlm.drift.inputs import passages

    dense = LLM(num_kv_blocks=256)
    ps = [p.prompt for p in passages(dense.tokenizer, 3, 400, 1)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return ps, greedy, [o.outputs[0].token_ids for o in dense.generate(ps, greedy)]


def sparse_llm(budget):
    from tierlm import LLM
    from tierlm.config import CacheConfig, EngineConfig

    return LLM.from_config(EngineConfig(cache=CacheConfig(num_blocks=256),
                                        sparse=SparseConfig(selector="quest", budget_tokens=budget)))


def test_engine_within_the_budget_gives_dense_greedy_tokens(passages_and_dense):
    ps, greedy, dense = passages_and_dense
    llm = sparse_llm(1024)
    assert [o.outputs[0].token_ids for o in llm.generate(ps, greedy)] == dense
    kv = llm.engine.kv_storage  # key bounds are kept in the sparse layers (from layer 2 on), not the dense ones
    assert kv[2].block_meta["key_max"].abs().sum() > 0 and kv[0].block_meta["key_max"].abs().sum() == 0


def test_engine_sparse_decoding_is_batch_invariant(passages_and_dense):
    ps, greedy, dense = passages_and_dense
    llm = sparse_llm(128)  # ~400-token contexts: most blocks are left out
    batch = [o.outputs[0].token_ids for o in llm.generate(ps, greedy)]
    alone = llm.generate(ps[1], greedy)[0].outputs[0].token_ids
    assert batch[1] == alone
    assert batch != dense  # a budget this small does change the text: the picks are in effect
