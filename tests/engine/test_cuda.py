"""The engine on a CUDA device (skipped where there is none).

Tiny random Llama-family models (written by tests/helpers/random_model.py, with a word-level tokenizer built
here, so neither the default model nor any download is needed) run by tierlm on the device must give:
greedy tokens identical to tierlm on CPU and to transformers on the same device, with logprobs within
1e-3 (fp32); bf16 that tracks fp32; batch invariance; reproducible per-request seeded sampling; prefix
caching that computes fewer tokens for the same output; the same output through preemption and chunked
prefill; and the sampler's device paths (penalties, masks, seeded generators, logprobs).

TIERLM_TEST_DEVICE=cpu runs the same checks on CPU, to check the tests themselves without a GPU.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from tierlm import LLM, SamplingParams
from helpers.random_model import write_random_model
from helpers.tiny_llama import BASE, EOS, VOCAB, ids, write_word_tokenizer
from tierlm.config import ModelConfig
from tierlm.core.request import Request
from tierlm.engine.sampler import Sampler

DEVICE = os.environ.get("TIERLM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

FP32_TOL = 1e-3
FAMILIES = {
    "llama": {},
    "qwen2": dict(architecture="qwen2", attention_bias=True, rope_theta=1000000.0),  # q/k/v bias
    "qwen3": dict(architecture="qwen3", qk_norm=True, head_dim=64, rope_theta=1000000.0),  # q/k norm, wide heads
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [ids(5, 1), ids(17, 2), ids(40, 3), ids(90, 4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> path of a tiny random model directory (written once per module)."""
    made: dict[str, str] = {}

    def get(family: str = "llama") -> str:
        if family not in made:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            write_random_model(d, ModelConfig(**{**BASE, **FAMILIES[family]}), seed=7, std=0.15, norm_std=0.2)
            write_word_tokenizer(d)
            made[family] = str(d)
        return made[family]

    return get


def engine(path: str, device: str = DEVICE, **kw) -> LLM:
    kw.setdefault("dtype", "fp32")
    if "num_kv_blocks" not in kw:
        kw.setdefault("kv_cache_memory", 16 << 20)
    return LLM(path, device=device, **kw)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_logprobs_close(a, b, tol: float, where: str) -> None:
    """Per step, every token reported by both (sampled + top-n) has logprobs within tol."""
    assert len(a) == len(b), where
    for step, (la, lb) in enumerate(zip(a, b)):
        da, db = {x.token_id: x.logprob for x in la}, {x.token_id: x.logprob for x in lb}
        common = da.keys() & db.keys()
        assert common, (where, step)
        for t in common:
            assert abs(da[t] - db[t]) < tol, (where, step, t, da[t], db[t])


@pytest.fixture(autouse=True)
def _free_device_memory():
    yield
    gc.collect()
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_matches_cpu_and_transformers(family, tiny):
    path = tiny(family)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    # A small step budget: chunked prefill and steps mixing decodes with prefill chunks.
    dev = engine(path, max_num_batched_tokens=24).generate(PROMPTS, params)
    cpu = engine(path, "cpu", max_num_batched_tokens=24).generate(PROMPTS, params)
    assert tokens(dev) == tokens(cpu)
    for i, (a, b) in enumerate(zip(dev, cpu)):
        assert_logprobs_close(a.outputs[0].logprobs, b.outputs[0].logprobs, FP32_TOL, f"{family} prompt {i} vs cpu")

    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    for i, (prompt, out) in enumerate(zip(PROMPTS, dev)):
        got = out.outputs[0].token_ids
        with torch.inference_mode():
            x = torch.tensor([prompt], device=DEVICE)
            hf = ref.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
            logits = ref(torch.tensor([prompt + got], device=DEVICE)).logits[0].float()
        assert got == hf[0, len(prompt):].tolist(), (family, i)
        ref_lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).cpu()  # [12, V]: each step's distribution
        for step, lps in enumerate(out.outputs[0].logprobs):
            for lp in lps:
                assert abs(lp.logprob - ref_lp[step, lp.token_id].item()) < FP32_TOL, (family, i, step)


def test_bf16_tracks_fp32(tiny):
    path = tiny("llama")
    prompts = [ids(8 + 3 * i, 100 + i) for i in range(32)]
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2)
    f32 = engine(path).generate(prompts, one)
    b16 = engine(path, dtype="bf16").generate(prompts, one)
    agree = 0
    for i, (a, b) in enumerate(zip(f32, b16)):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]  # [sampled, top-1, top-2]
        lead = la[0].logprob - max((x.logprob for x in la[1:] if x.token_id != la[0].token_id), default=-1e9)
        same = a.outputs[0].token_ids == b.outputs[0].token_ids
        agree += same
        # Where fp32's choice is clear, bf16 (~3 significant digits) makes the same one, at a similar logprob.
        if lead > 0.3:
            assert same, (i, lead)
        if same:
            assert abs(la[0].logprob - lb[0].logprob) < 0.2, i
    assert agree >= 0.8 * len(prompts), f"bf16 picks fp32's first token on only {agree}/{len(prompts)} prompts"
    # A few tokens of greedy decoding agree on most prompts.
    four = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    same4 = sum(a == b for a, b in zip(tokens(engine(path).generate(PROMPTS, four)),
                                       tokens(engine(path, dtype="bf16").generate(PROMPTS, four))))
    assert same4 >= 3, f"bf16 matches fp32's first 4 greedy tokens on {same4}/4 prompts"


# ---------------------------------------------------------------- engine behaviour on the device


def test_batch_invariance(tiny):
    llm = engine(tiny("llama"))
    prompts = [ids(3 + 11 * i, 200 + i) for i in range(8)]  # 3 .. 80 tokens
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    batch = llm.generate(prompts, params)
    for i in (0, 5, 7):
        alone = llm.generate(prompts[i], params)[0]
        assert alone.outputs[0].token_ids == batch[i].outputs[0].token_ids, i
        assert_logprobs_close(alone.outputs[0].logprobs, batch[i].outputs[0].logprobs, 1e-4, f"prompt {i}")


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    llm = engine(tiny("llama"))
    prompt = PROMPTS[1]
    for extra in (dict(top_p=0.9), dict(top_k=20), dict(min_p=0.05, repetition_penalty=1.2)):
        p = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True, **extra)
        a = llm.generate(prompt, p)[0].outputs[0].token_ids
        others = [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True), p,
                  SamplingParams(temperature=0.0, max_tokens=5)]
        b = llm.generate([PROMPTS[0], prompt, PROMPTS[2]], others)[1]
        c = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True, **extra))[0]
        assert a == b.outputs[0].token_ids, extra
        assert a != c.outputs[0].token_ids, extra
    n = llm.generate(prompt, SamplingParams(n=3, temperature=1.2, max_tokens=8, seed=7, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in n.outputs}) > 1


def test_prefix_cache_hit_gives_same_output_with_fewer_computed_tokens(tiny):
    path = tiny("llama")
    llm = engine(path)
    prompt = ids(100, 300) + ids(5, 301)
    c = llm.engine.counters
    first = llm.generate(prompt, GREEDY)[0]
    computed_first = c["computed_tokens"]
    second = llm.generate(prompt, GREEDY)[0]
    computed_second = c["computed_tokens"] - computed_first
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 16 * ((len(prompt) - 1) // 16) > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert computed_second == computed_first - second.num_cached_tokens
    # A shared prefix with a different tail hits too, and matches a cache-off engine.
    other = ids(100, 300) + ids(9, 302)
    hit = llm.generate(other, GREEDY)[0]
    assert hit.num_cached_tokens >= 96
    off = engine(path, enable_prefix_caching=False).generate(other, GREEDY)[0]
    assert off.num_cached_tokens == 0 and off.outputs[0].token_ids == hit.outputs[0].token_ids


def test_preemption_under_tiny_pool_gives_same_output(tiny):
    path = tiny("llama")
    prompts = [ids(12, 400 + i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = tokens(engine(path).generate(prompts, params))
    small = engine(path, num_kv_blocks=14, block_size=16)  # 224 slots for 6 x 52 tokens: must preempt
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert tokens(outs) == ref
    small.engine.kv.check_integrity()
    assert small.engine.kv.num_free_blocks == 14


def test_chunked_prefill_gives_same_output(tiny):
    path = tiny("llama")
    prompt = ids(150, 500)
    ref = engine(path, max_num_batched_tokens=512).generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert engine(path, max_num_batched_tokens=16).generate(prompt, GREEDY)[0].outputs[0].token_ids == ref


def test_host_tier_loads_give_the_same_output(tiny):
    """Prefixes evicted from a small device pool to the host tier come back through the load path (on CUDA: pinned
    staging, copies and scatter on the load stream, the compute stream waiting on their event) and give the
    same tokens as recomputing them."""
    from tierlm.config import TierConfig

    path = tiny("llama")
    prompts = [ids(64, 600 + i) + ids(4, 700 + i) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = tokens(engine(path, enable_prefix_caching=False).generate(prompts, params))
    llm = engine(path, num_kv_blocks=12, tiers=TierConfig(host_memory_bytes=8 << 20))
    first = tokens(llm.generate(prompts, params))  # one at a time fits; each evicts the one before
    again = tokens(llm.generate(prompts, params))
    assert first == ref and again == ref
    assert llm.engine.tier_stats()["host"]["hit_tokens"] >= 3 * 64


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="the default KV budget on CUDA")
def test_default_kv_budget_on_cuda(tiny):
    llm = LLM(tiny("llama"), device=DEVICE, dtype="auto", max_num_seqs=8)  # auto: bf16 on CUDA
    eng = llm.engine
    assert eng.dtype == torch.bfloat16 and eng.kv_storage[0].data.is_cuda
    # Capped at what max_num_seqs full-length sequences can use: 8 x 1024 / 16 blocks.
    assert 0 < eng.num_kv_blocks <= 8 * 1024 // 16
    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


# ---------------------------------------------------------------- the sampler on the device


def _requests() -> list[Request]:
    def r(rid, out=(), **p):
        return Request(rid, [5, 6, 7, 5], SamplingParams(**p), output_token_ids=list(out))

    return [
        r("greedy", temperature=0.0),
        r("penalized", out=[9, 9, 10], temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
          frequency_penalty=0.2),
        r("min-tokens", out=[4], temperature=0.0, min_tokens=5, logprobs=3),
        r("top-k", temperature=0.8, top_k=20, seed=1),
        r("top-p", temperature=1.0, top_p=0.8, seed=2, logprobs=2),
        r("min-p", temperature=1.0, min_p=0.1),
        r("plain", temperature=0.7, seed=3),
        r("k-and-p", temperature=1.0, top_k=10, top_p=0.9, seed=4, frequency_penalty=0.3, out=[11]),
    ]


def test_sampler_on_device_matches_cpu_where_deterministic():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    logits[2, EOS] = 50.0  # min_tokens must mask it
    cpu = Sampler((EOS,), seed=0)(logits, _requests())
    dev = Sampler((EOS,), seed=0)(logits.to(DEVICE), _requests())
    assert dev.token_ids[:3] == cpu.token_ids[:3]  # greedy rows, penalties and masks included
    assert dev.token_ids[2] != EOS
    assert all(0 <= t < VOCAB for t in dev.token_ids)
    for i in (2, 4):  # rows that asked for logprobs: the top-n entries are deterministic
        assert [x.token_id for x in dev.logprobs[i][1:]] == [x.token_id for x in cpu.logprobs[i][1:]]
        for a, b in zip(dev.logprobs[i][1:], cpu.logprobs[i][1:]):
            assert abs(a.logprob - b.logprob) < 1e-5
    top = logits[3].topk(20).indices.tolist()
    assert dev.token_ids[3] in top  # top-k respected


def test_sampler_seeded_rows_reproducible_on_device():
    logits = (torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1)) * 2).to(DEVICE)

    def run(order: list[int], steps: int = 3) -> dict[str, list[int]]:
        s = Sampler((EOS,))  # unseeded shared generator: unseeded rows differ run to run
        reqs = _requests()
        got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        for _ in range(steps):
            batch = [reqs[i] for i in order]
            out = s(logits[order], batch)
            for r, t in zip(batch, out.token_ids):
                got[r.request_id].append(t)
        return got

    a = run(list(range(8)))
    b = run([7, 6, 5, 4, 3, 2, 1, 0])
    c = run([3, 4, 6, 7])  # seeded rows only
    for rid in ("top-k", "top-p", "plain", "k-and-p"):
        assert a[rid] == b[rid] == c[rid], rid
