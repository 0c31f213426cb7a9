"""Prompt policies over HTTP: reject (400 with the context wording), truncate_left, truncate_middle
(system prompt and recent turns kept, messages dropped in groups so the prefix stays cacheable), and
summarize (summary cached and reused across turns). Budgets come from tierlm_max_prompt_tokens so the
prompts stay short."""
from __future__ import annotations

import pytest
from server_testing import assert_envelope

SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def chat(http, messages, policy=None, budget=None, max_tokens=4, **extra):
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    if policy:
        body["tierlm_prompt_policy"] = policy
    if budget:
        body["tierlm_max_prompt_tokens"] = budget
    return http.post("/v1/chat/completions", json=body)


def conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Question {i}: what is {i} plus {i}? Please explain in detail."})
        msgs.append({"role": "assistant", "content": f"{i} plus {i} is {2 * i}, because adding {i} twice gives {2 * i}."})
    msgs.append({"role": "user", "content": "And what is 10 plus 10?"})
    return msgs


def context_len(engine) -> int:
    return min(engine.max_model_len, engine.kv.num_blocks * engine.kv.block_size)


def test_context_overflow_rejected_with_conventional_wording(http, server):
    mml = context_len(server.aengine.engine)
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == mml
    r = http.post("/v1/completions", json={"prompt": [100] * (mml - 4), "max_tokens": 16})
    err = assert_envelope(r, 400, "prompt")
    assert f"maximum context length is {mml} tokens" in err["message"]
    assert err["code"] == "context_length_exceeded"


def test_budget_rejected_by_default(http):
    err = assert_envelope(chat(http, conversation(6), budget=100), 400, "tierlm_max_prompt_tokens")
    assert "100" in err["message"]


def test_truncate_left_over_budget(http):
    ids = list(range(1000, 1300))
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0,
                                           "tierlm_prompt_policy": "truncate_left", "tierlm_max_prompt_tokens": 120})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tierlm"]["prompt_policy"] == "truncate_left" and r.headers["x-tierlm-prompt-policy"] == "truncate_left"
    assert body["usage"]["prompt_tokens"] == 120
    assert body["tierlm"]["prompt_tokens_dropped"] == 180


def test_truncate_middle_keeps_system_and_recent_turns(http):
    msgs = conversation(6)
    r = chat(http, msgs, "truncate_middle", budget=160)
    assert r.status_code == 200, r.text
    info = r.json()["tierlm"]
    assert info["prompt_policy"] == "truncate_middle" and info["dropped_messages"] % 4 == 0
    assert r.json()["usage"]["prompt_tokens"] <= 160
    # One more turn drops the same messages: the kept prefix is identical, so the prefix cache hits past the
    # system prompt.
    nxt = msgs + [{"role": "assistant", "content": "20."}, {"role": "user", "content": "Thanks!"}]
    r2 = chat(http, nxt, "truncate_middle", budget=180)
    assert r2.json()["tierlm"]["dropped_messages"] == info["dropped_messages"]
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64


def test_truncate_middle_streamed_reports_policy(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": conversation(6), "max_tokens": 3, "temperature": 0, "stream": True,
            "tierlm_prompt_policy": "truncate_middle", "tierlm_max_prompt_tokens": 160}) as r:
        assert r.headers["x-tierlm-prompt-policy"] == "truncate_middle"
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
    assert '"prompt_policy":"truncate_middle"' in first


def test_truncate_middle_text_keeps_head_and_tail(http):
    ids = list(range(2000, 2300))
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "temperature": 0,
                                           "tierlm_prompt_policy": "truncate_middle", "tierlm_max_prompt_tokens": 100})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100


def test_summarize_caches_summary_across_turns(http, server):
    summarizer = server.app.state.summarizer
    msgs = conversation(6)
    misses = summarizer.misses
    r = chat(http, msgs, "summarize", budget=300, max_tokens=3)
    assert r.status_code == 200, r.text
    info = r.json()["tierlm"]
    assert info["prompt_policy"] == "summarize" and info["summary_cache_hit"] is False
    assert summarizer.misses == misses + 1
    # The next turn drops the same messages: the summary comes from the cache and the prompt prefix
    # (system + summary + kept turns) is reused from the KV prefix cache.
    nxt = msgs + [{"role": "assistant", "content": "20."}, {"role": "user", "content": "Thanks!"}]
    r2 = chat(http, nxt, "summarize", budget=320, max_tokens=3)
    info2 = r2.json()["tierlm"]
    assert info2["summary_cache_hit"] is True and info2["dropped_messages"] == info["dropped_messages"]
    assert summarizer.misses == misses + 1
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128


@pytest.mark.parametrize("policy", ["truncate_left", "truncate_middle"])
def test_max_tokens_over_context_is_400_even_with_policy(http, server, policy):
    mml = context_len(server.aengine.engine)
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": mml, "tierlm_prompt_policy": policy})
    assert_envelope(r, 400, "max_tokens")
