"""The GPU decode path end to end: the Triton attention backend and captured decode steps (engine/captured.py),
on a tiny random Llama model, against the eager torch backend (the reference).

Runs on TIERLM_TEST_DEVICE (default: cpu). On the CPU the Triton kernels run under Triton's interpreter and a
"captured" step is the same static-buffer path replayed by running it again, after a check that it holds no
operation a CUDA graph cannot capture; on the device (scripts/device_check.sh sets TIERLM_TEST_DEVICE=cuda)
the graphs are real CUDA graphs.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.attention import TritonBackend
from tierlm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SparseConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.engine.captured import check_capturable, default_sizes
from helpers.random_model import write_random_model
from helpers.tiny_llama import BASE, ids, write_word_tokenizer

DEVICE = os.environ.get("TIERLM_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.skipif(
    TritonBackend.unsupported(torch.device(DEVICE), torch.float32, "fp32") is not None,
    reason=f"triton backend: {TritonBackend.unsupported(torch.device(DEVICE), torch.float32, 'fp32')}")

PROMPTS = [ids(5, 11), ids(19, 12), ids(33, 13)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-captured")
    write_random_model(d, ModelConfig(**BASE), seed=3, std=0.15, norm_std=0.2)
    write_word_tokenizer(d)
    return str(d)


def config(path, backend="torch", captured="off", kv_format=None, **kw) -> EngineConfig:
    return EngineConfig(model=path, dtype="fp32", device=DEVICE, attention_backend=backend, captured_decode=captured,
                        cache=CacheConfig(memory_bytes=4 << 20, kv_format=kv_format),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), **kw)


def run(cfg: EngineConfig, prompts=PROMPTS, params=GREEDY):
    llm = LLM.from_config(cfg)
    try:
        return llm.generate(prompts, params), llm.engine
    finally:
        llm.close()


def same_tokens_close_logprobs(a, b, tol=1e-3):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for la, lb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            da, db = {p.token_id: p.logprob for p in la}, {p.token_id: p.logprob for p in lb}
            for t in da.keys() & db.keys():
                assert abs(da[t] - db[t]) < tol


@pytest.mark.parametrize("kv_format", [None, "fp8_e4m3", "fp8_e4m3_ue8m0"])
def test_triton_and_captured_match_eager_torch(tiny, kv_format):
    ref, _ = run(config(tiny, kv_format=kv_format))
    eager, _ = run(config(tiny, "triton", kv_format=kv_format))
    captured, eng = run(config(tiny, "triton", "on", kv_format=kv_format))
    same_tokens_close_logprobs(eager, ref)
    same_tokens_close_logprobs(captured, ref)
    g = eng.runner.graphs
    # 3 sequences decode together (size 4, one padded row), then fewer as none stop early: ignore_eos
    assert g.counters["replays"] >= 8 and 4 in g.graphs


def test_padded_rows_write_only_the_pad_block(tiny):
    """Padded rows of a captured step write their K/V to the pad block, which the KV manager never hands out:
    every other block holds exactly what the eager run wrote."""
    prompts = [ids(21, 40)]  # one row, captured at size 2: one padded row (sizes 2 and 4 only)
    cfg = dataclasses.replace(config(tiny, "triton", "on"), cuda_graph_sizes=(2, 4))
    eager_llm = LLM.from_config(config(tiny, "triton"))
    cap_llm = LLM.from_config(cfg)
    try:
        a = eager_llm.generate(prompts, GREEDY)
        b = cap_llm.generate(prompts, GREEDY)
        assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
        g = cap_llm.engine.runner.graphs
        assert list(g.graphs) == [2] and g.pad_block == cap_llm.engine.kv.num_blocks
        pad = g.pad_block
        ka, kb = eager_llm.engine.kv_storage[0].data, cap_llm.engine.kv_storage[0].data
        torch.testing.assert_close(kb[:, :pad], ka[:, :pad], atol=1e-5, rtol=1e-5)
        assert kb[:, pad].abs().sum() > 0 and ka[:, pad].abs().sum() == 0  # the pad block took the padded writes
    finally:
        eager_llm.close()
        cap_llm.close()


def test_what_runs_eager(tiny):
    """Prefill steps, a sparse selector, and the torch backend run eager; captured_decode="on" says why not."""
    _, eng = run(config(tiny, "triton", "on"), prompts=[ids(40, 5)],
                 params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert eng.runner.graphs.counters["replays"] == 2  # 3 tokens: the first sampled from the prefill step
    with pytest.raises(InvalidParameterError, match="cannot be captured"):
        LLM.from_config(config(tiny, "torch", "on"))
    with pytest.raises(InvalidParameterError, match="sparse selector"):
        LLM.from_config(config(tiny, "triton", "on", sparse=SparseConfig(selector="quest", budget_tokens=256)))
    auto = LLM.from_config(config(tiny, "triton", "auto"))
    try:
        assert (auto.engine.runner.graphs is not None) == DEVICE.startswith("cuda")
    finally:
        auto.close()


def test_the_checker_finds_host_syncs():
    x = torch.arange(6.0)
    _, bad = check_capturable(lambda: x[x > 2].sum() + x.max().item())
    assert "aten._local_scalar_dense" in bad and any("boolean" in b or "nonzero" in b for b in bad)
    _, ok = check_capturable(lambda: torch.where(x > 2, x, 0).sum())
    assert ok == []


def test_default_sizes_and_bad_sizes():
    assert default_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_sizes(3) == [1, 2, 3]
    with pytest.raises(InvalidParameterError, match="cuda-graph-sizes"):
        EngineConfig(cuda_graph_sizes=(0, 4))
