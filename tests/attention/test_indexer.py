"""The lightning indexer (attention/indexer.py): the batched FP8 op equals the formula spelled out in loops when
both see the same FP8 inputs, and stays within the FP8 error bound of full precision; picks are causal, in
position order, all visible tokens when k covers the context; head weights and ReLU act as the formula says;
the FP8 key cache is the same however it is written (and through a scrambled block table); a model without
indexer weights is refused with the fix named."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierlm.attention.indexer as indexer_mod
from tierlm.attention.indexer import (
    DEEPSEEK_V32,
    IndexerKeyCache,
    IndexerWeights,
    block_rows,
    fp8_queries,
    index_scores,
    index_topk,
    lightning_index,
    reference_index_scores,
    reference_topk,
    require_indexer,
    write_indexer_keys,
)
from tierlm.core.errors import InvalidParameterError

E4M3_REL = 2.0 ** -4  # half a step of a 3-bit mantissa, relative
E4M3_SUB = 2.0 ** -10  # half the subnormal step (2^-9), in units of the scale


def setup(t, s, h, d, seed, chunk_start=None, dtype=torch.float32):
    """T queries at the last positions of an S-token context (a prefill chunk, or decode when T == 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g).to(dtype)
    w = torch.randn(t, h, generator=g).to(dtype)
    k = torch.randn(s, d, generator=g)
    cache = IndexerKeyCache.empty(s, d)
    write_indexer_keys(cache, k, torch.arange(s))
    start = s - t if chunk_start is None else chunk_start
    return q, w, k, cache, torch.arange(start, start + t)


def assert_same_picks(picks, ref_scores, k, tol):
    """picks equal the reference's top-k, except where the reference's own scores tie within tol."""
    ref = reference_topk(ref_scores, k)
    for row, (got, want) in enumerate(zip(picks.tolist(), ref)):
        got = [p for p in got if p >= 0]
        assert len(got) == len(want)
        if got == want:
            continue
        kth = sorted(ref_scores[row, want].tolist())[0]
        for p in set(got) ^ set(want):
            assert abs(float(ref_scores[row, p]) - kth) <= tol, (row, got, want)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 6), extra=st.integers(0, 30), h=st.integers(1, 4), d=st.sampled_from([4, 8, 16]),
       k=st.integers(1, 40), bf16=st.booleans(), seed=st.integers(0, 999))
def test_fast_op_equals_the_formula_on_the_same_fp8_inputs(t, extra, h, d, k, bf16, seed):
    q, w, _, cache, pos = setup(t, t + extra, h, d, seed, dtype=torch.bfloat16 if bf16 else torch.float32)
    scores = index_scores(q, w, cache, pos)
    ref = reference_index_scores(fp8_queries(q), w.float(), cache.keys(), pos)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref))
    mag = reference_index_scores(fp8_queries(q).abs(), w.float().abs(), cache.keys().abs(), pos)
    tol = 1e-5 * mag.clamp_min(1.0)
    fin = torch.isfinite(ref)
    assert ((scores.double() - ref).abs()[fin] <= tol[fin]).all()
    assert_same_picks(index_topk(scores, k), ref, k, tol=1e-5 * float(mag[fin].max().clamp_min(1.0)))


@pytest.mark.parametrize("t,s,h,d", [(1, 33, 4, 16), (5, 20, 3, 32), (8, 8, 8, 8)])
def test_fp8_scores_stay_within_the_quantization_bound_of_full_precision(t, s, h, d):
    q, w, k, cache, pos = setup(t, s, h, d, seed=t * s)
    scores = index_scores(q, w, cache, pos).double()
    exact = reference_index_scores(q, w, k, pos)
    # per element |x - fp8(x)| <= 2^-4 |x| + 2^-10 scale; ReLU is 1-Lipschitz, so per head |dq . k' + q . dk|
    sq = q.abs().amax(-1, keepdim=True) / 448
    sk = k.abs().amax(-1, keepdim=True) / 448
    eq, ek = E4M3_REL * q.abs() + E4M3_SUB * sq, E4M3_REL * k.abs() + E4M3_SUB * sk
    per_head = torch.einsum("thd,sd->ths", eq, k.abs() + ek) + torch.einsum("thd,sd->ths", q.abs(), ek)
    bound = torch.einsum("th,ths->ts", w.abs(), per_head).double() * 1.001 + 1e-5
    fin = torch.isfinite(exact)
    err = (scores - exact).abs()[fin]
    assert (err <= bound[fin]).all()
    assert err.max() > 0  # the op really quantizes (and not only the keys: see the same-inputs test)


def test_deepseek_v32_shapes_pick_the_top_2048():
    h, d, k = DEEPSEEK_V32["heads"], DEEPSEEK_V32["head_dim"], DEEPSEEK_V32["topk"]
    q, w, _, cache, pos = setup(2, 3000, h, d, seed=7)
    scores = index_scores(q, w, cache, pos)
    dense = torch.einsum("thd,sd->ths", fp8_queries(q).double(), cache.keys().double()).relu()
    ref = torch.einsum("th,ths->ts", w.double(), dense)
    ref[0, -1] = float("-inf")  # query 0 sits at position 2998
    assert torch.allclose(scores.double(), ref, rtol=1e-5, atol=1e-4)
    picks = index_topk(scores, k)
    assert picks.shape == (2, k)
    assert_same_picks(picks, ref, k, tol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_picks_are_causal_in_position_order_and_all_visible_when_k_covers_the_context(k):
    q, w, _, cache, pos = setup(6, 12, 2, 8, seed=k, chunk_start=0)  # positions 0..5 of 12 written
    scores = index_scores(q, w, cache, pos, rows=torch.arange(12))
    assert torch.isinf(scores[:, 6:]).all() and (scores[:, 6:] < 0).all()
    picks = index_topk(scores, k)
    assert picks.shape == (6, k)
    for t in range(6):
        row = picks[t]
        got = row[row >= 0]
        assert (got <= t).all()  # no future token
        assert torch.equal(got, got.sort().values)
        assert len(got) == min(k, t + 1)
        if k >= t + 1:  # every visible token, in order, then padding
            assert got.tolist() == list(range(t + 1))
            assert (row[t + 1:] == -1).all()
    assert torch.equal(lightning_index(q, w, cache, pos, 100, rows=torch.arange(12)),
                       index_topk(scores, 100))
    with pytest.raises(InvalidParameterError):
        index_topk(scores, 0)
    with pytest.raises(ValueError):
        index_scores(q, w, cache, pos + 100, rows=torch.arange(12))  # queries past the context


def test_ties_go_to_the_earlier_position():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, float("-inf")], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert index_topk(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert index_topk(scores, 5).tolist() == [[0, 1, 2, 3, -1], [0, 1, 2, 3, 4]]


def test_head_weights_weight_heads_as_the_formula_says():
    q, w, _, cache, pos = setup(4, 10, 3, 8, seed=3)
    base = index_scores(q, w, cache, pos)
    keys, qf = cache.keys(), fp8_queries(q)
    for j in range(3):
        w0 = w.clone()
        w0[:, j] = 0
        head = torch.einsum("td,sd->ts", qf[:, j], keys).relu() * w[:, j:j + 1]  # head j's term
        diff = (base - index_scores(q, w0, cache, pos)).nan_to_num(0.0, 0.0, 0.0)
        assert torch.allclose(diff, head.masked_fill(torch.isinf(base), 0.0), atol=1e-5)
        assert head.abs().max() > 0.1  # so the check above has teeth
    doubled = index_scores(q, 2 * w, cache, pos)
    assert torch.allclose(doubled, 2 * base, atol=1e-5)


def test_relu_clips_negative_dot_products():
    d = 4
    keys = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]])
    cache = IndexerKeyCache.empty(3, d)
    write_indexer_keys(cache, keys, torch.arange(3))
    q = torch.tensor([[[2.0, 0, 0, 0], [-1.0, 1.0, 0, 0]]])  # head 0 likes key 0, head 1 likes key 1
    w = torch.tensor([[1.0, 3.0]])
    scores = index_scores(q, w, cache, torch.tensor([2]))
    # without ReLU: key 0 = 2 - 3 = -1, key 1 = 3, key 2 = -2 + 3 = 1; with it: 2, 3, 3
    assert scores.tolist() == [[2.0, 3.0, 3.0]]
    assert index_topk(scores, 1).tolist() == [[1]]
    assert index_topk(scores, 2).tolist() == [[1, 2]]  # key 2 beats key 0 only because head 0's -2 is clipped
    assert reference_index_scores(q, w, keys, torch.tensor([2])).tolist() == [[2.0, 3.0, 3.0]]


def test_cache_written_token_by_token_equals_once_and_through_a_block_table():
    g = torch.Generator().manual_seed(5)
    n, d, bs = 23, 16, 4
    k = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, n)[:, None]  # scales differ per token
    once = IndexerKeyCache.empty(n, d)
    write_indexer_keys(once, k, torch.arange(n))
    step = IndexerKeyCache.empty(n, d)
    a = 0
    for size in [1, 5, 1, 7, 2, 7]:
        write_indexer_keys(step, k[a:a + size], torch.arange(a, a + size))
        a += size
    assert a == n and torch.equal(once.data, step.data) and torch.equal(once.scales, step.scales)
    assert torch.allclose(once.keys(), k, rtol=E4M3_REL * 1.01, atol=1e-6 * float(k.abs().max()))

    table = torch.randperm(12, generator=g)[:6]  # a scrambled pool of 12 blocks
    rows = block_rows(table, n, bs)
    assert torch.equal(rows // bs, table.repeat_interleave(bs)[:n])
    paged = IndexerKeyCache.empty(12 * bs, d)
    for t in range(n):
        write_indexer_keys(paged, k[t:t + 1], rows[t:t + 1])
    q, w = torch.randn(3, 2, d, generator=g), torch.randn(3, 2, generator=g)
    pos = torch.tensor([4, 15, 22])
    assert torch.equal(index_scores(q, w, paged, pos, rows), index_scores(q, w, once, pos))


def test_chunked_queries_equal_one_matmul(monkeypatch):
    q, w, _, cache, pos = setup(9, 20, 3, 8, seed=11)
    whole = index_scores(q, w, cache, pos)
    monkeypatch.setattr(indexer_mod, "_CHUNK_ELEMS", 2 * 3 * 20)  # two queries per chunk
    assert torch.allclose(index_scores(q, w, cache, pos), whole, rtol=0, atol=1e-6)


def test_weights_project_to_the_op_shapes():
    g = torch.Generator().manual_seed(0)
    wts = IndexerWeights.random(32, 4, 8, g, q_in=12)
    assert (wts.num_heads, wts.head_dim) == (4, 8)
    x, latent = torch.randn(5, 32, generator=g), torch.randn(5, 12, generator=g)
    q, k, w = wts.project(x, latent)
    assert q.shape == (5, 4, 8) and k.shape == (5, 8) and w.shape == (5, 4)
    assert torch.allclose(k.mean(-1), torch.zeros(5), atol=1e-5)  # LayerNorm at identity: zero mean
    assert torch.allclose(w, x @ wts.ww.T / (4 * 8) ** 0.5)
    assert lightning_index(q, w, _cache_of(k), torch.arange(5), 2).shape == (5, 2)


def _cache_of(k):
    cache = IndexerKeyCache.empty(k.shape[0], k.shape[1])
    write_indexer_keys(cache, k, torch.arange(k.shape[0]))
    return cache


class _WithIndexer:
    class config:  # noqa: N801 (stands in for a ModelConfig)
        model_id = "v4-mini-test"
        num_layers = 4

    def __init__(self):
        self.weights = {i: IndexerWeights.random(16, 2, 8) for i in (1, 3)}  # layers 0, 2 dense

    def indexer_weights(self, layer_idx):
        return self.weights.get(layer_idx)


def test_require_indexer_refuses_a_model_without_indexer_weights():
    from tierlm.config import ModelConfig
    from tierlm.models.llama import LlamaForCausalLM

    cfg = ModelConfig("llama", 32, 16, 32, 2, 2, 1, 8, 64, model_id="SmolLM2-135M-Instruct")
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    for model, name in [(llama, "SmolLM2-135M-Instruct"), (object(), "object")]:
        with pytest.raises(InvalidParameterError) as err:
            require_indexer(model)
        assert err.value.problem == ("sparse selector 'indexer' needs a model with trained lightning-indexer "
                                     f"weights; {name} has none")
        assert err.value.fix == "use --sparse quest (training-free, any model)"
        assert "--sparse quest" in str(err.value)

    none_trained = _WithIndexer()
    none_trained.weights = {}
    with pytest.raises(InvalidParameterError, match="v4-mini-test has none"):
        require_indexer(none_trained)


def test_require_indexer_returns_the_layers_weights():
    model = _WithIndexer()
    found = require_indexer(model)
    assert sorted(found) == [1, 3] and found[1] is model.weights[1]
    assert list(require_indexer(model, layers=[3])) == [3]
    with pytest.raises(InvalidParameterError):
        require_indexer(model, layers=[0, 2])
