"""The official openai client against a real server: chat and completions, streamed and not, and the
OpenAI fields users rely on (usage with cached tokens, logprobs, n, stop, seed, max_completion_tokens)."""
from __future__ import annotations

import pytest

from tierlm import SamplingParams

from server_testing import openai_client

MODEL = "default"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def client(server):
    c = openai_client(server.url)
    yield c
    c.close()


def offline(engine_llm, prompt_ids, max_tokens=8):
    return engine_llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0]


def test_models_and_health(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_matches_offline(client, default_llm):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", **GREEDY)
    c = r.choices[0]
    ref = offline(default_llm, default_llm.tokenizer.encode("The capital of France is"))
    assert c.text == ref.text and c.finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == 5 + len(ref.token_ids)
    assert r.model_extra["tierlm"]["prompt_policy"] == "none"


def test_completion_stream_with_usage(client):
    full = client.completions.create(model=MODEL, prompt="One, two, three,", **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="One, two, three,", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stream_and_cached_tokens(client, default_llm):
    msgs = [{"role": "system", "content": "You are a terse assistant. " * 8},
            {"role": "user", "content": "Name a color."}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, **GREEDY)
    ref = offline(default_llm, default_llm.apply_chat_template(msgs))
    assert first.choices[0].message.content == ref.text
    assert first.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=msgs, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == first.usage.prompt_tokens
    # The second request with the same prompt reuses the first one's full KV blocks.
    assert usage.prompt_tokens_details.cached_tokens >= 16 * ((usage.prompt_tokens - 1) // 16)
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_max_completion_tokens_n_and_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_completion_tokens=6, n=3, temperature=1.0, seed=7)
    assert len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 18
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           max_completion_tokens=6, n=3, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_n_streamed(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=5,
                                            temperature=0.8, seed=3, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


def test_stop_string(client):
    free = client.completions.create(model=MODEL, prompt="List: apples, pears,", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[3:5]
    r = client.completions.create(model=MODEL, prompt="List: apples, pears,", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[: free.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="List: apples, pears,", max_tokens=12, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 3 for t in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = [ch.choices[0].logprobs for ch in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3, stream=True) if ch.choices]
    assert sum((s.token_logprobs for s in streamed if s), []) == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    assert all(c.logprob <= 0 for c in content)
    none = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert none.choices[0].logprobs is None


def test_metrics_exposed(client, http):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    text = http.get("/metrics").text
    for name in ("tierlm_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
                 "tierlm_time_to_first_token_seconds_count", "tierlm_time_per_output_token_seconds_count",
                 "tierlm_e2e_request_latency_seconds_count", "tierlm_queue_length", "tierlm_num_requests_running",
                 "tierlm_num_requests_waiting", "tierlm_prompt_tokens_total", "tierlm_generation_tokens_total",
                 "tierlm_prefix_cache_hits_total", "tierlm_preemptions_total", "tierlm_kv_cache_usage_ratio"):
        assert name in text, name


def test_no_auth_when_no_keys_configured(http):
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
    assert http.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
