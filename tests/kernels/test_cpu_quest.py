"""The native Quest block selection (kernels.cpu.quest_select) against QuestSelector's torch path
(attention/sparse.py, the reference): the same kept blocks in the same order, the same lengths, on random
batches mixing rows within and over the budget, scrambled block tables, several head groupings, head dims,
sink / window / budget settings and logit scales; arguments it does not take fall back."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tierlm.attention import sparse
from tierlm.attention.sparse import QuestSelector, quest_scores
from tierlm.kernels import cpu as K

HAVE_CC = K._compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the torch path is used")


def test_the_kernel_is_built_here():
    assert K._library() is not None, K.status()


def selector(bs, sink_tokens, window_tokens, budget_tokens):
    cfg = SimpleNamespace(budget_tokens=budget_tokens, sink_tokens=sink_tokens, window_tokens=window_tokens,
                          dense_layers=0)
    return QuestSelector(cfg, bs)


def make_case(lens, hkv, g, d, bs, seed, spread=1.0, extra_blocks=0):
    """A pool of bounds bigger than the batch uses, scrambled tables whose padding holds other valid ids."""
    gen = torch.Generator().manual_seed(seed)
    mb = max(-(-n // bs) for n in lens) + extra_blocks
    nb = len(lens) * mb + 7
    lo = torch.randn(nb, hkv, d, generator=gen) * spread
    hi = lo + torch.rand(nb, hkv, d, generator=gen) * 2 * spread
    tables = torch.randperm(nb, generator=gen)[: len(lens) * mb].view(len(lens), mb).clone()
    q = torch.randn(len(lens), hkv * g, d, generator=gen)
    layer = SimpleNamespace(block_meta={"key_min": lo, "key_max": hi})
    return q, layer, tables, torch.tensor(lens, dtype=torch.int64)


def rel_scores(sel, q, layer, tables, lens, scale, row):
    """The torch path's rel over row `row`'s candidates, keyed by position."""
    bs = sel.block_size
    nblocks = -(-int(lens[row]) // bs)
    cand = list(range(sel.sink_blocks, nblocks - sel.window_blocks))
    b = tables[row, cand]
    u = quest_scores(q[row: row + 1], layer.block_meta["key_min"][b][None], layer.block_meta["key_max"][b][None])[0]
    rel = torch.logsumexp((u - u.amax(0, keepdim=True)) * scale, dim=-1)
    return dict(zip(cand, rel.tolist()))


def assert_same_picks(sel, q, layer, tables, lens, scale):
    want = sel._select_torch(q, layer, tables, lens, scale)
    got = sel.select(q, layer, tables, lens, scale)
    assert torch.equal(got.seq_lens, want.seq_lens)
    assert got.block_tables.shape == want.block_tables.shape
    if torch.equal(got.block_tables, want.block_tables):
        return
    # torch's topk breaks near-ties by its own rounding: rows may differ only in blocks whose scores tie
    # (to fp32 rounding) with the last one taken
    for row in range(len(lens)):
        if torch.equal(got.block_tables[row], want.block_tables[row]):
            continue
        rel = rel_scores(sel, q, layer, tables, lens, scale, row)
        pos = {int(b): j for j, b in enumerate(tables[row].tolist())}
        n_keep = -(-int(want.seq_lens[row]) // sel.block_size)
        g_set = {pos[int(b)] for b in got.block_tables[row, :n_keep]}
        w_set = {pos[int(b)] for b in want.block_tables[row, :n_keep]}
        taken = sorted(rel[j] for j in w_set if j in rel)
        for j in g_set ^ w_set:
            assert j in rel and abs(rel[j] - taken[0]) <= 1e-4 * max(1.0, abs(taken[0])), (row, j)


CASES = [  # (hkv, g, d, bs, sink_tokens, window_tokens, budget_tokens)
    (3, 3, 64, 16, 16, 64, 1024),  # the default model's shape and the benchmark's settings
    (1, 1, 16, 4, 4, 8, 24),
    (2, 3, 32, 4, 0, 4, 40),  # no sink blocks
    (4, 2, 128, 16, 32, 32, 256),
    (1, 8, 40, 8, 8, 16, 64),  # a head dim off the specialised ones
    (2, 2, 64, 4, 4, 20, 24),  # budget == sink + window: no candidates taken
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_native_picks_equal_the_torch_path(case, n):
    hkv, g, d, bs, sink, window, budget = case
    sel = selector(bs, sink, window, budget)
    budget_len = sel.budget_blocks * bs
    gen = torch.Generator().manual_seed(n * 131 + d)
    for trial in range(4):
        # rows within the budget (some at a block boundary, one of a single token) mixed with rows over it
        lens = [int(x) for x in torch.randint(1, 4 * budget_len, (n,), generator=gen)]
        lens[0] = max(lens[0], budget_len + 1)  # at least one row over the budget
        if n > 2:
            lens[1] = 1 if trial % 2 else budget_len
            lens[2] = (sel.budget_blocks + 1 + trial) * bs  # over, ending on a block boundary
        q, layer, tables, lens_t = make_case(lens, hkv, g, d, bs, seed=trial * 17 + n, extra_blocks=trial % 2)
        for scale in (d ** -0.5, 2.0):  # a large scale underflows most heads' terms: logsumexp's max matters
            assert_same_picks(sel, q, layer, tables, lens_t, scale)
            got = K.quest_select(q, layer.block_meta["key_min"], layer.block_meta["key_max"], tables, lens_t, bs,
                                 sel.sink_blocks, sel.window_blocks, sel.budget_blocks, scale)
            assert got is not None  # the native path did run


def test_long_contexts_at_the_default_shape():
    sel = selector(16, 16, 64, 1024)
    for ctx, seed in ((4096, 0), (8192, 1), (16384, 2)):
        lens = [ctx - 7, ctx // 2 + 3, 900, ctx]
        q, layer, tables, lens_t = make_case(lens, 3, 3, 64, 16, seed=seed, spread=0.5)
        assert_same_picks(sel, q, layer, tables, lens_t, 0.125)


def test_kept_blocks_are_sink_window_and_the_best_candidates_in_position_order():
    sel = selector(4, 4, 8, 24)  # 1 sink, 2 window, 6 blocks in all
    q, layer, tables, lens = make_case([37, 22, 9], 2, 2, 16, 4, seed=3)
    picks = sel.select(q, layer, tables, lens, 0.3)
    assert picks.block_tables.shape == (3, 6)
    assert picks.seq_lens.tolist() == [5 * 4 + 1, 22, 9]
    pos = [{int(b): j for j, b in enumerate(tables[r].tolist())} for r in range(3)]
    kept = [pos[0][int(b)] for b in picks.block_tables[0]]
    assert kept == sorted(kept) and kept[0] == 0 and kept[-2:] == [8, 9]
    rel = rel_scores(sel, q, layer, tables, lens, 0.3, 0)
    assert sorted(kept[1:-2]) == sorted(sorted(rel, key=lambda j: -rel[j])[:3])
    assert picks.block_tables[2].tolist() == tables[2, :3].tolist() + [int(tables[2, 0])] * 3  # padded


def test_ties_go_to_the_lower_position():
    sel = selector(4, 4, 4, 16)  # 1 sink, 1 window, 2 picked of the candidates
    q, layer, tables, lens = make_case([40], 1, 2, 8, 4, seed=5)
    lo, hi = layer.block_meta["key_min"], layer.block_meta["key_max"]
    same = tables[0, 1:9]
    lo[same] = lo[same[0]].clone()  # candidates 1..8 share their bounds; 9 is the window
    hi[same] = hi[same[0]].clone()
    picks = sel.select(q, layer, tables, lens, 0.5)
    assert picks.block_tables[0].tolist() == tables[0, [0, 1, 2, 9]].tolist()


def test_within_the_budget_the_tables_come_back_unchanged():
    sel = selector(16, 16, 64, 1024)
    q, layer, tables, lens = make_case([1024, 17, 1], 3, 3, 64, 16, seed=0)
    picks = sel.select(q, layer, tables, lens, 0.125)
    assert picks.block_tables is tables and picks.seq_lens is lens


def test_arguments_the_kernel_does_not_take_fall_back():
    sel = selector(4, 4, 8, 24)
    q, layer, tables, lens = make_case([37, 22], 2, 2, 16, 4, seed=1)
    lo, hi = layer.block_meta["key_min"], layer.block_meta["key_max"]
    args = (4, sel.sink_blocks, sel.window_blocks, sel.budget_blocks, 0.3)
    assert K.quest_select(q, lo, hi, tables, lens, *args) is not None
    bad = tables.clone()
    bad[0, 3] = lo.shape[0]  # a block id past the pool
    assert K.quest_select(q, lo, hi, bad, lens, *args) is None
    assert K.quest_select(q, lo, hi, tables, lens, *args, width=5) is None  # narrower than a row keeps
    assert K.quest_select(q, lo, hi, tables, lens.clone().fill_(10 * 4 * 4), *args) is None  # past the table
    assert K.quest_select(q, lo.transpose(1, 2), hi.transpose(1, 2), tables, lens, *args) is None


def test_without_the_kernels_select_is_the_torch_path(monkeypatch):
    sel = selector(4, 4, 8, 24)
    q, layer, tables, lens = make_case([37, 22, 60], 2, 2, 16, 4, seed=2)
    want = sel._select_torch(q, layer, tables, lens, 0.3)
    monkeypatch.setattr(sparse.cpu_kernels, "usable", lambda *t: False)
    monkeypatch.setattr(sparse.cpu_kernels, "quest_select", None)  # would raise if called
    got = sel.select(q, layer, tables, lens, 0.3)
    assert torch.equal(got.block_tables, want.block_tables) and torch.equal(got.seq_lens, want.seq_lens)
