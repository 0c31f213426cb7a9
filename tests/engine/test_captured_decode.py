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
from tierlm.engine.captured import check_capturable, default_sizes, table_widths
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
    # 3 sequences decode together (size 4, one padded row; ignore_eos: none stops early)
    assert g.counters["replays"] >= 8 and (4, 64) in g.graphs


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
        assert list(g.graphs) == [(2, 64)] and g.pad_block == cap_llm.engine.kv.num_blocks  # 1024 tokens: 64 blocks
        pad = g.pad_block
        ka, kb = eager_llm.engine.kv_storage[0].data, cap_llm.engine.kv_storage[0].data
        torch.testing.assert_close(kb[:, :pad], ka[:, :pad], atol=1e-5, rtol=1e-5)
        assert kb[:, pad].abs().sum() > 0 and ka[:, pad].abs().sum() == 0  # the pad block took the padded writes
    finally:
        eager_llm.close()
        cap_llm.close()


def test_what_runs_eager(tiny):
    """Prefill steps run eager; the torch backend and a spill store cannot be captured (captured_decode="on" says
    why)."""
    _, eng = run(config(tiny, "triton", "on"), prompts=[ids(40, 5)],
                 params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert eng.runner.graphs.counters["replays"] == 2  # 3 tokens: the first sampled from the prefill step
    with pytest.raises(InvalidParameterError, match="cannot be captured"):
        LLM.from_config(config(tiny, "torch", "on"))
    with pytest.raises(InvalidParameterError, match="spill store"):
        LLM.from_config(config(tiny, "triton", "on", sparse=SparseConfig(selector="quest", budget_tokens=256,
                                                                        spill_bytes=1 << 20)))
    auto = LLM.from_config(config(tiny, "triton", "auto"))
    try:
        assert (auto.engine.runner.graphs is not None) == DEVICE.startswith("cuda")
    finally:
        auto.close()


@pytest.mark.parametrize("selector", ["quest", "index"])
def test_sparse_decode_captured_matches_eager(tiny, selector):
    """A capturable selector picks on the device with static shapes inside the captured step: the same tokens as the
    eager sparse engine (whose picks on a CPU come from the native selector), with contexts past the budget."""
    sparse = SparseConfig(selector=selector, budget_tokens=48, sink_tokens=16, window_tokens=16, dense_layers=0)
    prompts = [ids(90, 21), ids(120, 22)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    eager, _ = run(config(tiny, "triton", sparse=sparse), prompts, params)
    captured, eng = run(config(tiny, "triton", "on", sparse=sparse), prompts, params)
    dense, _ = run(config(tiny, "triton"), prompts, params)
    same_tokens_close_logprobs(captured, eager)
    assert eng.runner.graphs.counters["replays"] >= 7
    # the budget binds: sparse decoding's tokens or logprobs differ from dense's
    def seen(outs):
        return [[(p.token_id, round(p.logprob, 4)) for lp in o.outputs[0].logprobs for p in lp] for o in outs]

    assert seen(captured) != seen(dense)


@pytest.mark.parametrize("selector", ["dense", "quest"])
def test_table_widths_follow_the_longest_context(tiny, selector):
    """A step runs the graph of the narrowest captured table width that holds its longest table (block size 4: the
    1024-token context is 256 blocks, captured 64 and 256 wide): a short and a long request each get theirs, with
    the eager engine's tokens."""
    sparse = SparseConfig(selector=selector, budget_tokens=64, sink_tokens=8, window_tokens=16, dense_layers=0)
    cfg = dataclasses.replace(config(tiny, "triton", "on", sparse=sparse),
                              cache=CacheConfig(memory_bytes=4 << 20, block_size=4),
                              scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512))  # one prefill step
    prompts = [ids(30, 31), ids(300, 32)]  # 10 and 78 blocks by the end
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    captured, eng = run(cfg, prompts, params)
    eager, _ = run(dataclasses.replace(cfg, captured_decode="off"), prompts, params)
    same_tokens_close_logprobs(captured, eager)
    assert eng.runner.graphs.widths == [64, 256]
    assert set(eng.runner.graphs.graphs) == {(2, 256)}  # decoded together: the long one sets the width
    one, eng1 = run(cfg, prompts[:1], params)
    assert set(eng1.runner.graphs.graphs) == {(1, 64)}
    assert one[0].outputs[0].token_ids == captured[0].outputs[0].token_ids


def test_the_checker_finds_host_syncs():
    x = torch.arange(6.0)
    _, bad = check_capturable(lambda: x[x > 2].sum() + x.max().item())
    assert "aten._local_scalar_dense" in bad and any("boolean" in b or "nonzero" in b for b in bad)
    _, ok = check_capturable(lambda: torch.where(x > 2, x, 0).sum())
    assert ok == []


def test_default_sizes_widths_and_bad_sizes():
    assert default_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert table_widths(2048) == [64, 256, 1024, 2048] and table_widths(64) == [64] and table_widths(10) == [10]
    assert default_sizes(3) == [1, 2, 3]
    with pytest.raises(InvalidParameterError, match="cuda-graph-sizes"):
        EngineConfig(cuda_graph_sizes=(0, 4))


@pytest.mark.parametrize("kv_format", ["fp32", "bf16", "fp8_e4m3", "fp8_e5m2_g64_ue8m0", "fp8_e4m3_static"])
def test_every_kv_format_writes_and_decodes_capturably(kv_format):
    """A decode layer's K/V write (FP8: quantize on write) and Triton attention hold no uncapturable operation, in
    every KV format (a static format once built a tensor from a Python list: a blocking copy on CUDA)."""
    from tierlm.attention import AttentionContext, AttentionMetadata
    from tierlm.kvcache import KVSpec, KVStorage

    dev = torch.device(DEVICE)
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_dim=128, kv_format=kv_format, block_size=4)
    storage = KVStorage(spec, 8, dev)
    if storage[0].static_scales is not None:
        storage[0].static_scales = torch.full((2, 2), 0.01, device=dev)
    meta = AttentionMetadata(block_size=4, slot_mapping=torch.tensor([5, 13], device=dev), num_decodes=2,
                             decode_block_tables=torch.tensor([[0, 1], [2, 3]], device=dev),
                             decode_seq_lens=torch.tensor([6, 6], device=dev))
    q, k, v = torch.randn(2, 4, 128, device=dev), torch.randn(2, 2, 128, device=dev), torch.randn(2, 2, 128, device=dev)
    backend = TritonBackend()
    backend.prepare(meta, 8)
    out, bad = check_capturable(lambda: AttentionContext(meta, storage, backend).forward(0, q, k, v, 128 ** -0.5))
    assert bad == [] and out.shape == (2, 4, 128)


@pytest.mark.parametrize("selector", ["quest", "index"])
def test_sparse_picks_are_capturable(selector):
    """A captured step's selector work (metadata kept on write, picks with static shapes) holds no uncapturable
    operation; the eager picks (dynamic widths) do, which is why a captured step asks for static ones."""
    from tierlm.attention import AttentionContext, AttentionMetadata
    from tierlm.attention.sparse import build_selector
    from tierlm.kvcache import KVSpec, KVStorage

    dev = torch.device(DEVICE)
    sel = build_selector(SparseConfig(selector=selector, budget_tokens=16, sink_tokens=4, window_tokens=4,
                                      dense_layers=0), 4)
    storage = KVStorage(KVSpec(num_layers=1, num_kv_heads=2, head_dim=64, kv_format="fp8_e4m3", block_size=4), 16, dev)
    sel.add_meta(storage)
    layer = storage[0]
    slots = torch.arange(44, device=dev)
    kk = torch.randn(44, 2, 64, device=dev)
    layer.write_slots(slots, kk, kk)
    sel.on_write(layer, slots, kk, 4)
    meta = AttentionMetadata(block_size=4, slot_mapping=torch.tensor([43], device=dev), num_decodes=1,
                             decode_block_tables=torch.arange(11, device=dev)[None],
                             decode_seq_lens=torch.tensor([44], device=dev))
    q, k = torch.randn(1, 4, 64, device=dev), torch.randn(1, 2, 64, device=dev)
    backend = TritonBackend()
    backend.prepare(meta, 16)
    for captured in (True, False):
        ctx = AttentionContext(meta, storage, backend, sel, captured=captured)
        _, bad = check_capturable(lambda: ctx.forward(0, q, k, k, 0.125))
        if captured or dev.type == "cpu":  # on a GPU every pick is static
            assert (bad == []) == captured, bad
