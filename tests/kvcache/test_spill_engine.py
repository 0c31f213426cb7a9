"""Sparse decoding over contexts larger than the device pool, on the default model: with spilling on, a pool
smaller than one sequence's context decodes the same greedy tokens, with the same log-probabilities, as a pool
that holds everything, under the same picks (same budget, same prefill chunks). The cpu backend's kernels read
spilled blocks where they are (host memory or a mapped file); the torch backend stages a sparse layer's picks
on the device and gathers what a dense layer reads; all of it exact."""
from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams
from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig, SparseConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)


def engine(num_blocks, spill=0, backend="auto", kv_format=None, dense_layers=0, spill_dir=None):
    # 128-token prefill chunks in both pools, so the prefill splits (and so the rounding) are the same
    return LLM.from_config(EngineConfig(
        cache=CacheConfig(num_blocks=num_blocks, kv_format=kv_format), attention_backend=backend,
        scheduler=SchedulerConfig(max_num_batched_tokens=128),
        sparse=SparseConfig(selector="quest", budget_tokens=256, dense_layers=dense_layers, spill_bytes=spill,
                            staging_tokens=512, spill_dir=spill_dir)))


@pytest.fixture(scope="module")
def prompts():
    from tierlm.drift.inputs import passages

    llm = engine(16)
    return [p.prompt for p in passages(llm.tokenizer, 2, 1000, 1)]


def run(llm, prompts):
    outs = llm.generate(prompts, GREEDY)
    return [o.outputs[0].token_ids for o in outs], [[lp[0].logprob for lp in o.outputs[0].logprobs] for o in outs]


@pytest.mark.parametrize("backend, kv_format, dense_layers, backing", [
    ("cpu", None, 0, "host"),  # every layer sparse; the kernels read spilled picks in place
    ("cpu", "fp8_e4m3", 2, "file"),  # FP8 from a mapped file, two dense layers reading every spilled block in place
    ("torch", "fp8_e4m3", 2, "host"),  # sparse layers stage their picks; dense layers gather spilled blocks
])
def test_a_context_beyond_the_pool_decodes_like_a_pool_that_holds_it(prompts, backend, kv_format, dense_layers,
                                                                      backing, tmp_path):
    big = engine(256, backend=backend, kv_format=kv_format, dense_layers=dense_layers)
    want_tokens, want_lp = run(big, prompts)
    # a pool of 32 blocks (512 tokens; on the torch backend 32 more of staging) for two ~1,000-token contexts
    in_place = backend == "cpu"
    small = engine(32 if in_place else 64, spill=1 << 28, backend=backend, kv_format=kv_format,
                   dense_layers=dense_layers, spill_dir=tmp_path if backing == "file" else None)
    eng = small.engine
    assert eng.kv.num_blocks == 32 and all(len(p) > 32 * 16 for p in prompts)
    tokens, lp = run(small, prompts)
    assert tokens == want_tokens and lp == want_lp
    st = eng.spill.stats()
    assert st["spilled"] > 0 and st["free"] == st["slots"]  # finished sequences gave their slots back
    if in_place:
        assert st["staging_blocks"] == st["loads"] == st["gathers"] == 0
    else:
        assert st["loads"] > 0 and st["hits"] > st["loads"]  # picks repeat across steps: staged ones are hits
        assert (st["gathers"] > 0) == (dense_layers > 0)
    assert st["backing"] == backing
    eng.kv.check_integrity()
