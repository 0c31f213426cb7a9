"""Engine faults found in review, each pinned by a test that failed before its fix (default model):
a preempted request that never fit a step again (hang), KV cached before it was written (poisoned
prefix cache after a failed step), and requests silently cut short by a small KV pool."""
from __future__ import annotations

import logging

import pytest

from tierlm import LLM, SamplingParams
from tierlm.core.errors import PromptTooLongError

PROMPTS = ("The quick brown fox jumps over the lazy dog while the small cat sleeps on the warm mat today",
           "A long river runs through the green valley and past the old mill near the quiet village tonight")


def drive(llm: LLM, prompts, params, max_steps: int = 2000):
    """Generate by stepping the engine, failing (instead of hanging) if it stops making progress."""
    eng = llm.engine
    ids = [eng.add_request(p, params) for p in prompts]
    done = {}
    for _ in range(max_steps):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if len(done) == len(ids):
            return [done[i] for i in ids]
    pytest.fail(f"no progress: {len(done)}/{len(ids)} finished after {max_steps} steps "
                f"(waiting {len(eng.scheduler.waiting)}, running {len(eng.scheduler.running)})")


def test_preempted_request_longer_than_a_step_is_not_stuck(default_llm):
    """Chunking off, a pool too small for both requests: the preempted one comes back with prompt + output
    (> the 24-token step budget) and used to wait forever for a step it could never get."""
    prompts = list(PROMPTS)  # 20 and 18 tokens: both run at once, then need 8 blocks of the 5
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = LLM(num_kv_blocks=5, block_size=16, enable_chunked_prefill=False, enable_prefix_caching=False,
              max_num_batched_tokens=24)
    outs = drive(llm, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    ref = default_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.engine.kv.num_free_blocks == 5
    llm.engine.kv.check_integrity()


def test_a_failed_step_leaves_no_reusable_kv(monkeypatch, default_llm):
    """The forward pass raises once; the same prompt afterwards must not reuse the never-written blocks."""
    llm = LLM(kv_cache_memory=64 << 20)
    prompt = "Shared prefix that spans several blocks of the cache, repeated for length. " * 6
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runner = llm.engine.runner
    real = runner.execute

    def broken(sched):
        for s in sched.scheduled:  # the step allocated its slots; now "the device fails"
            assert s.block_table
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(runner, "execute", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate(prompt, params)
    monkeypatch.setattr(runner, "execute", real)
    assert llm.engine.kv.stats.prefix_cache_hits == 0 and not llm.engine.kv.pool.cached
    out = llm.generate(prompt, params)[0]
    assert out.num_cached_tokens == 0  # nothing was reusable
    assert out.outputs[0].token_ids == default_llm.generate(prompt, params)[0].outputs[0].token_ids
    again = llm.generate(prompt, params)[0]  # now the prefix was written and is reused
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == out.outputs[0].token_ids


def test_small_pool_caps_the_context_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="tierlm.engine.llm_engine"):
        llm = LLM(num_kv_blocks=4, block_size=16)
    assert llm.engine.max_model_len == 64
    assert "the KV cache holds 64 tokens" in caplog.text and "--kv-cache-memory" in caplog.text
    prompt = "one two three four five six seven eight nine ten"
    n = len(llm.tokenizer.encode(prompt))
    with pytest.raises(PromptTooLongError, match=r"64 tokens \(the KV cache holds 64 tokens\).*max_tokens"):
        llm.generate(prompt, SamplingParams(max_tokens=100))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 64 - n and out.finish_reason == "length"  # filled the capped context exactly


def test_max_tokens_over_the_model_context_is_rejected_up_front(default_llm):
    with pytest.raises(PromptTooLongError, match="8192 tokens.*8000 in the prompt, 500 in max_tokens"):
        default_llm.generate([1] * 8000, SamplingParams(max_tokens=500))
    assert not default_llm.engine.has_unfinished_requests()


def test_sequences_admitted_in_one_step_share_the_prompt_blocks():
    """n > 1 sequences of one request are admitted in the same step: the second reuses the first's prompt
    blocks (registered at allocation, written in that step before either attends), and both generate
    what one sequence alone would."""
    llm = LLM(kv_cache_memory=64 << 20)
    prompt = "A prompt long enough to fill several blocks of sixteen tokens, repeated. " * 4
    n_prompt = len(llm.tokenizer.encode(prompt))
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate(prompt, params)[0]
    stats = llm.engine.kv.stats
    assert stats.prefix_cache_hits == (n_prompt - 1) // 16 * 16  # the second sequence hit every full block
    one = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == one.outputs[0].token_ids


def test_a_request_id_that_names_another_requests_sequence_is_refused(default_llm):
    from tierlm.core.errors import InvalidParameterError

    eng = default_llm.engine
    eng.add_request("Hello there", SamplingParams(n=2, max_tokens=3), request_id="x")
    try:
        with pytest.raises(InvalidParameterError, match="'x#0' is already in use"):
            eng.add_request("Another prompt", SamplingParams(max_tokens=3), request_id="x#0")
        with pytest.raises(InvalidParameterError, match="'x' is already in use"):
            eng.add_request("Another prompt", SamplingParams(max_tokens=3), request_id="x")
    finally:
        eng.abort_request("x")
    assert not eng.has_unfinished_requests()
    eng.kv.check_integrity()
