"""The embedded default model end to end: parity with transformers, batch invariance, caching, preemption."""
from __future__ import annotations

import torch

from tierlm import LLM, SamplingParams

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "List three prime numbers: 2, 3,",
]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water in Celsius?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(default_llm, hf_reference):
    prompts = [default_llm.tokenizer.encode(p) for p in PLAIN] + [default_llm.apply_chat_template(c) for c in CHATS]
    outs = default_llm.generate(prompts, GREEDY)
    for ids, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_reference, ids, 24), default_llm.tokenizer.decode(ids)


def test_prefill_logits_close_to_transformers(default_llm, hf_reference):
    ids = default_llm.tokenizer.encode(PLAIN[2])
    out = default_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_reference(torch.tensor([ids])).logits[0, -1].float(), -1)
    top = out.outputs[0].logprobs[0]
    for lp in top:
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-3


def test_batch_invariance(default_llm):
    base = "Explain why the ocean is salty. " * 3
    prompts = [base[: 10 + 17 * i] for i in range(8)]
    alone = default_llm.generate(prompts[5], GREEDY)[0].outputs[0].token_ids
    batch = default_llm.generate(prompts, GREEDY)
    assert batch[5].outputs[0].token_ids == alone


def test_prefix_cache_hit_gives_same_output():
    llm = LLM(kv_cache_memory=64 << 20)
    prefix = "You are a careful assistant. Here is a long shared context about caches. " * 6
    c = llm.engine.counters
    first = llm.generate(prefix + "Question one?", GREEDY)[0]
    computed_first = c["computed_tokens"]
    second = llm.generate(prefix + "Question one?", GREEDY)[0]
    computed_second = c["computed_tokens"] - computed_first
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 16 * ((len(second.prompt_token_ids) - 1) // 16)
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # The model computed exactly the cached tokens fewer the second time.
    assert computed_second == computed_first - second.num_cached_tokens
    # A different tenant salt or a prefix-cache-off engine computes everything.
    off = LLM(kv_cache_memory=64 << 20, enable_prefix_caching=False)
    off.generate(prefix + "Question one?", GREEDY)
    again = off.generate(prefix + "Question one?", GREEDY)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_preemption_under_tiny_pool_gives_same_output(default_llm):
    prompts = [f"Write a short story about robot number {i}." for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]
    tiny = LLM(num_kv_blocks=14, block_size=16)  # 224 tokens for 6 x ~52: must preempt
    outs = tiny.generate(prompts, params)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == ref
    tiny.engine.kv.check_integrity()
    assert tiny.engine.kv.num_free_blocks == 14


def test_chunked_prefill_gives_same_output(default_llm):
    prompt = "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 20
    ref = default_llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    small = LLM(kv_cache_memory=64 << 20, max_num_batched_tokens=32)
    assert small.generate(prompt, GREEDY)[0].outputs[0].token_ids == ref


def test_cache_salt_isolates_tenants():
    llm = LLM(kv_cache_memory=64 << 20)
    eng = llm.engine
    prompt = "Shared system prompt for every tenant of this service. " * 4
    params = SamplingParams(temperature=0, max_tokens=2)

    def cached(salt):
        rid = eng.add_request(prompt, params, cache_salt=salt)
        while True:
            for out in eng.step():
                if out.request_id == rid and out.finished:
                    return out.num_cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0  # same tenant: hit
    assert cached("tenant-b") == 0  # other tenant: no sharing
    assert cached(None) == 0
