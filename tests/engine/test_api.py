"""Python API behaviour on the default model: stopping, seeds, n, streaming, errors, abort."""
from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams
from tierlm.core.errors import InvalidParameterError, PromptTooLongError


def test_max_tokens_and_finish_reason(default_llm):
    out = default_llm.generate("Count: one, two,", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].finish_reason == "length"


def test_stop_string_cuts_text(default_llm):
    free = default_llm.generate("List: apples, pears,", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = free.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]  # a stop string that occurs early in the greedy text
    out = default_llm.generate("List: apples, pears,", SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.find(stop)]
    with_stop = default_llm.generate("List: apples, pears,", SamplingParams(
        temperature=0, max_tokens=20, stop=[stop], include_stop_str_in_output=True))[0]
    assert with_stop.outputs[0].text == text[: text.find(stop) + len(stop)]


def test_stop_token_id(default_llm):
    free = default_llm.generate("Numbers: 1 2 3", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    ids = free.outputs[0].token_ids
    out = default_llm.generate("Numbers: 1 2 3", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ids[3]]))[0]
    assert out.outputs[0].token_ids == ids[: ids.index(ids[3]) + 1]
    assert out.outputs[0].stop_reason == ids[3]


def test_seeded_sampling_is_reproducible_and_batch_independent(default_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    a = default_llm.generate("Tell me a fun fact:", p)[0].outputs[0].token_ids
    b = default_llm.generate(["Hello there", "Tell me a fun fact:", "Another one"], p)[1].outputs[0].token_ids
    c = default_llm.generate("Tell me a fun fact:", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                                   seed=99, ignore_eos=True))[0].outputs[0].token_ids
    assert a == b
    assert a != c


def test_n_returns_distinct_samples(default_llm):
    out = default_llm.generate("A random word:", SamplingParams(n=3, temperature=1.2, max_tokens=8, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stream_is_incremental_and_matches_generate(default_llm):
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    chunks = list(default_llm.stream("The moon is", p))
    assert len(chunks) == 12
    lengths = [len(c.outputs[0].token_ids) for c in chunks]
    assert lengths == list(range(1, 13))
    assert chunks[-1].finished
    assert chunks[-1].outputs[0].token_ids == default_llm.generate("The moon is", p)[0].outputs[0].token_ids


def test_logprobs_shape(default_llm):
    out = default_llm.generate("Hi", SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lps in zip(out.token_ids, out.logprobs):
        assert lps[0].token_id == tok and lps[0].logprob <= 0
        assert len(lps) == 3 and lps[1].logprob >= lps[2].logprob
        assert lps[0].token  # token text filled in


def test_chat_uses_template(default_llm):
    msgs = [{"role": "user", "content": "Say hi."}]
    ids = default_llm.apply_chat_template(msgs)
    assert default_llm.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>")
    out = default_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.prompt_token_ids == ids


def test_prompt_too_long_is_typed_error(default_llm):
    with pytest.raises(PromptTooLongError, match="maximum context length is 8192 tokens"):
        default_llm.generate([1] * 9000, SamplingParams(max_tokens=4))
    assert not default_llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 0},
                                    {"logprobs": 50}, {"stop": [""]}, {"repetition_penalty": 0}])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(e.value)


def test_abort_frees_blocks(default_llm):
    eng = default_llm.engine
    free0 = eng.kv.num_free_blocks
    rid = eng.add_request("Write a long essay about the sea.", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.kv.num_free_blocks < free0
    eng.abort_request(rid)
    assert eng.kv.num_free_blocks == free0
    assert not eng.has_unfinished_requests()
    eng.kv.check_integrity()


def test_prompt_over_step_budget_without_chunking_is_rejected_not_hung():
    llm = LLM(kv_cache_memory=32 << 20, enable_chunked_prefill=False, max_num_batched_tokens=16)
    with pytest.raises(InvalidParameterError, match="chunked prefill"):
        llm.generate("word " * 40, SamplingParams(max_tokens=2))
    out = llm.generate("short prompt", SamplingParams(temperature=0, max_tokens=2))[0]
    assert len(out.outputs[0].token_ids) == 2
