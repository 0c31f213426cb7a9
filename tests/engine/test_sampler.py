"""Sampler: greedy, penalties (exact formulas), top-k/top-p/min-p, min_tokens, seeds, logprobs, distribution."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from tierlm.core.request import Request
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.sampler import Sampler, SamplerOutput

EOS = 3


def req(rid="r", prompt=(), output=(), **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(**params), output_token_ids=list(output))


def probs_logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()  # [V]


def draw_counts(logits_row: torch.Tensor, n: int, seed: int = 0, **params) -> torch.Tensor:
    """Sample n times in one batch of n identical unseeded rows; return counts per token."""
    sampler = Sampler((EOS,), seed=seed)
    out = sampler(logits_row.expand(n, -1), [req(f"r{i}", **params) for i in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel())


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_fast_path_equals_argmax(dtype):
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = logits.clone()
    out = Sampler((EOS,))(logits, [req(str(i), temperature=0.0) for i in range(8)])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    assert torch.equal(logits, before)


def test_greedy_slow_path_equals_argmax_and_does_not_modify_input():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    reqs = [req(str(i), temperature=0.0, logprobs=0, output=[1, 2]) for i in range(4)]
    out = Sampler((EOS,))(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_mixed_greedy_and_sampled_batch():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(3))
    reqs = [req(str(i), temperature=0.0 if i % 2 == 0 else 1.0, seed=i) for i in range(6)]
    out = Sampler((EOS,))(logits, reqs)
    assert [out.token_ids[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()
    assert all(0 <= t < 30 for t in out.token_ids)


def test_empty_batch_and_bad_shape():
    s = Sampler((EOS,))
    assert s(torch.empty(0, 10), []) == SamplerOutput([], [])
    with pytest.raises(ValueError):
        s(torch.zeros(2, 10), [req()])


# ---------------------------------------------------------------- penalties (exact formulas)


def penalized(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Run the masking/penalty steps (2-4) exactly as __call__ does."""
    x = logits.clone()
    Sampler((EOS,))._penalize(x, reqs)
    return x


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0, 0.5]])
    r = req(prompt=[0, 0, 4], output=[1], repetition_penalty=2.0)
    got = penalized(logits, [r])
    # seen: 0 (positive -> /2, once despite repeats), 1 (negative -> *2), 4 (zero stays zero)
    assert torch.equal(got, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.0, 0.5]]))


def test_frequency_presence_formula_uses_output_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    r = req(prompt=[3, 3], output=[1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25)
    got = penalized(logits, [r])
    # token 1: 1 - (0.5*2 + 0.25); token 2: 1 - (0.5*1 + 0.25); token 3 only in prompt: unchanged
    assert torch.allclose(got, torch.tensor([[1.0, -0.25, 0.25, 1.0, 1.0]]))


def test_negative_presence_frequency_rewards():
    got = penalized(torch.zeros(1, 3), [req(output=[2], frequency_penalty=-1.0, presence_penalty=-0.5)])
    assert torch.allclose(got, torch.tensor([[0.0, 0.0, 1.5]]))


def test_repetition_before_frequency():
    # (2 / 2) - 1 = 0; the other order would give (2 - 1) / 2 = 0.5
    got = penalized(torch.tensor([[2.0, 0.0]]), [req(output=[0], repetition_penalty=2.0, frequency_penalty=1.0)])
    assert torch.allclose(got, torch.tensor([[0.0, 0.0]]))


def test_repetition_before_frequency_end_to_end():
    # right order: 2/2 - 1 = 0 < 0.25 -> token 1; wrong order: (2-1)/2 = 0.5 > 0.25 -> token 0
    r = req(temperature=0.0, output=[0], repetition_penalty=2.0, frequency_penalty=1.0)
    assert Sampler((EOS,))(torch.tensor([[2.0, 0.25]]), [r]).token_ids == [1]


def test_min_tokens_mask_survives_penalties():
    got = penalized(torch.tensor([[1.0, -1.0, 0.0, 5.0]]),
                    [req(output=[3], min_tokens=2, repetition_penalty=2.0, frequency_penalty=-2.0)])
    assert got[0, 3] == float("-inf")


def test_penalties_are_per_row():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    reqs = [req("a", prompt=[0, 1], repetition_penalty=4.0),
            req("b", prompt=[0, 1], output=[0]),  # no penalties: untouched
            req("c", output=[2, 2], presence_penalty=1.0, frequency_penalty=0.5)]
    got = penalized(logits, reqs)
    assert torch.allclose(got, torch.tensor([[0.5, -8.0, 1.0], [2.0, -2.0, 1.0], [2.0, -2.0, -1.0]]))


def test_out_of_range_token_ids_ignored():
    got = penalized(torch.ones(1, 3), [req(prompt=[7], output=[9], repetition_penalty=2.0, frequency_penalty=1.0)])
    assert torch.equal(got, torch.ones(1, 3))


def test_penalty_changes_greedy_choice_end_to_end():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    s = Sampler((EOS,))
    assert s(logits, [req(temperature=0.0)]).token_ids == [0]
    assert s(logits, [req(temperature=0.0, output=[0], presence_penalty=0.6)]).token_ids == [1]
    assert s(logits, [req(temperature=0.0, prompt=[0], repetition_penalty=1.3)]).token_ids == [1]
    assert s(logits, [req(temperature=0.0, prompt=[0], repetition_penalty=1.1)]).token_ids == [0]


# ---------------------------------------------------------------- min_tokens


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0, 8.0]])  # eos (3) best, then stop id 4, then 2
    s = Sampler((EOS,))
    assert s(logits, [req(temperature=0.0, min_tokens=2, stop_token_ids=[4], output=[1])]).token_ids == [2]
    assert s(logits, [req(temperature=0.0, min_tokens=2, stop_token_ids=[4], output=[1, 1])]).token_ids == [3]
    # ignore_eos does not lift the min_tokens mask
    assert s(logits, [req(temperature=0.0, min_tokens=1, ignore_eos=True)]).token_ids == [4]
    # sampled rows never pick a masked id either
    counts = draw_counts(logits[0], 500, min_tokens=3, stop_token_ids=[4])
    assert counts[3] == 0 and counts[4] == 0 and counts[2] > 0


# ---------------------------------------------------------------- top-k / top-p / min-p


def test_top_k_1_equals_greedy():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 200, generator=g)
    reqs = [req(str(i), temperature=1.5, top_k=1, seed=i if i % 2 else None) for i in range(16)]
    assert Sampler((EOS,))(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_keeps_exactly_k():
    logits = probs_logits([0.4, 0.3, 0.2, 0.1])
    counts = draw_counts(logits, 2000, top_k=2)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    for disabled in (0, -1, 10):
        assert (draw_counts(logits, 2000, top_k=disabled) > 0).all()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    counts = draw_counts(logits, 4000, top_p=0.8)
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0] > 0 and counts[1] > 0
    counts = draw_counts(logits, 4000, top_p=0.81)
    assert counts[2] > 0 and counts[3] == 0
    counts = draw_counts(logits, 4000, top_p=0.4)  # below the top token's mass: top token only
    assert counts.tolist() == [4000, 0, 0, 0]


def test_top_p_boundary_is_robust_to_fp32_rounding():
    # uniform over 25: five tokens carry exactly 0.2; fp32 cumsum lands just under 0.2 there
    counts = draw_counts(torch.zeros(25), 4000, top_p=0.2)
    assert int((counts > 0).sum()) == 5


def test_tiny_top_p_keeps_top_token():
    logits = probs_logits([0.1, 0.6, 0.3])
    assert draw_counts(logits, 500, top_p=1e-9).tolist() == [0, 500, 0]


def test_top_p_unsorted_vocab_and_after_top_k():
    # same distribution, permuted; top-k=3 renormalizes to [0.526, 0.316, 0.158]; top_p=0.8 -> {0.5, 0.3}
    logits = probs_logits([0.05, 0.3, 0.15, 0.5])
    counts = draw_counts(logits, 4000, top_k=3, top_p=0.8)
    assert counts[0] == 0 and counts[2] == 0 and counts[1] > 0 and counts[3] > 0


def test_min_p_relative_to_max():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    counts = draw_counts(logits, 4000, min_p=0.35)  # floor 0.175
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    counts = draw_counts(logits, 4000, min_p=0.25)  # floor 0.125
    assert counts[2] > 0 and counts[3] == 0


# ---------------------------------------------------------------- seeds


def run_steps(sampler: Sampler, batch: list[Request], steps: int, vocab: int = 64) -> dict[str, list[int]]:
    """Feed each request logits that depend only on (request_id, step); return each one's tokens."""
    for step in range(steps):
        rows = []
        for r in batch:
            g = torch.Generator().manual_seed(zlib.crc32(f"{r.request_id}/{step}".encode()))
            rows.append(torch.randn(vocab, generator=g))
        out = sampler(torch.stack(rows), batch)  # [B, V]
        for r, t in zip(batch, out.token_ids):
            r.output_token_ids.append(t)
    return {r.request_id: list(r.output_token_ids) for r in batch}


def test_same_seed_same_tokens_regardless_of_batch():
    params = dict(temperature=1.0, top_p=0.95, frequency_penalty=0.2)
    alone = run_steps(Sampler((EOS,)), [req("a", seed=7, **params)], 20)["a"]
    others = [req("x", **params), req("y", seed=8, **params), req("z", temperature=0.0)]
    in_batch = run_steps(Sampler((EOS,), seed=123), others[:2] + [req("a", seed=7, **params)] + others[2:], 20)
    reordered = run_steps(Sampler((EOS,)), [req("a", seed=7, **params), req("q", seed=1, **params)], 20)
    assert in_batch["a"] == alone
    assert reordered["a"] == alone
    assert len(set(alone)) > 1  # really sampling


def test_seeded_top_k_row_same_whether_batch_sorts_or_slices():
    # alone: top-k slice of width 10; with a top-p-only row: full sort; with top_k=40: slice of 40
    alone = run_steps(Sampler((EOS,)), [req("a", seed=5, top_k=10)], 20)["a"]
    sorted_batch = run_steps(Sampler((EOS,)), [req("p", top_p=0.5), req("a", seed=5, top_k=10)], 20)
    wide_batch = run_steps(Sampler((EOS,)), [req("a", seed=5, top_k=10), req("w", seed=6, top_k=40)], 20)
    assert sorted_batch["a"] == alone == wide_batch["a"]
    assert len(set(alone)) > 1


def test_seeded_row_without_top_k_same_whether_batch_sorts_or_not():
    alone = run_steps(Sampler((EOS,)), [req("a", seed=9, min_p=0.01)], 20)["a"]  # no sort
    in_sorted = run_steps(Sampler((EOS,)), [req("k", top_k=3), req("a", seed=9, min_p=0.01)], 20)["a"]
    assert in_sorted == alone and len(set(alone)) > 1


def test_different_seeds_differ():
    batch = [req("a", seed=1), req("b", seed=2)]
    # same logits for both rows -> only the seed can make them differ
    s = Sampler((EOS,))
    seqs = {"a": [], "b": []}
    logits = torch.zeros(2, 64)
    for _ in range(20):
        out = s(logits, batch)
        seqs["a"].append(out.token_ids[0])
        seqs["b"].append(out.token_ids[1])
    assert seqs["a"] != seqs["b"]


def test_seeded_generator_kept_until_forget():
    logits = torch.zeros(1, 1000)
    s = Sampler((EOS,))
    first = [s(logits, [req("a", seed=3)]).token_ids[0] for _ in range(5)]
    assert len(set(first)) > 1  # generator advances: not re-seeded every step
    s.forget("a")
    s.forget("never-seen")
    again = [s(logits, [req("a", seed=3)]).token_ids[0] for _ in range(5)]
    assert again == first


def test_sampler_wide_seed_reproducible():
    logits = torch.zeros(4, 1000)
    reqs = [req(str(i)) for i in range(4)]
    assert Sampler((EOS,), seed=9)(logits, reqs).token_ids == Sampler((EOS,), seed=9)(logits, reqs).token_ids


# ---------------------------------------------------------------- logprobs


def test_logprobs_sampled_first_then_sorted_top_n_from_raw_logits():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 40, generator=g)
    reqs = [req("a", logprobs=5, seed=0, repetition_penalty=3.0, prompt=list(range(40)), temperature=2.0),
            req("b"),
            req("c", logprobs=0, temperature=0.0, presence_penalty=2.0, output=[int(logits[2].argmax())])]
    out = Sampler((EOS,))(logits, reqs)
    raw = torch.log_softmax(logits, dim=-1)
    a = out.logprobs[0]
    assert len(a) == 6
    assert a[0].token_id == out.token_ids[0]
    assert a[0].logprob == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    top = raw[0].topk(5)
    assert [e.token_id for e in a[1:]] == top.indices.tolist()
    assert [e.logprob for e in a[1:]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert all(x.logprob >= y.logprob for x, y in zip(a[1:], a[2:]))
    assert out.logprobs[1] is None
    c = out.logprobs[2]
    assert len(c) == 1 and c[0].token_id == out.token_ids[2] != int(logits[2].argmax())  # penalty moved it
    assert c[0].logprob == pytest.approx(raw[2, out.token_ids[2]].item(), abs=1e-6)
    assert all(math.isfinite(e.logprob) for e in a + c)


def test_logprobs_bf16_input_and_n_larger_than_vocab():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    out = Sampler((EOS,))(logits, [req(temperature=0.0, logprobs=20)])
    assert [e.token_id for e in out.logprobs[0]] == [2, 2, 1, 0]
    assert out.logprobs[0][0].logprob == pytest.approx(torch.log_softmax(logits.float(), -1)[0, 2].item())


# ---------------------------------------------------------------- distribution


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square, 3 degrees of freedom: P(X > 16.27) = 0.001
CHI2_3DOF_999 = 16.27


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_distribution_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    counts = draw_counts(logits, 4000, seed=0, temperature=temperature)
    assert chi_square(counts.float(), torch.softmax(logits / temperature, -1)) < CHI2_3DOF_999
    # and it must be able to fail: the untempered distribution is rejected at T=0.5
    if temperature == 0.5:
        assert chi_square(counts.float(), torch.softmax(logits, -1)) > CHI2_3DOF_999


def test_seeded_row_distribution_matches_softmax():
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    s = Sampler((EOS,))
    r = req("a", seed=42)
    counts = torch.bincount(torch.tensor([s(logits, [r]).token_ids[0] for _ in range(4000)]), minlength=4)
    assert chi_square(counts.float(), torch.softmax(logits[0], -1)) < CHI2_3DOF_999
