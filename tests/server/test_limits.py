"""Limits and safety on a small server (2 running sequences, 1 queued, 3 s timeout, 64 KiB bodies, two
API keys): every error path answers the OpenAI envelope, overflow gives 503 + Retry-After and no crash."""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from server_testing import assert_envelope, make_engine, openai_client, running_server

from tierlm.server.server_config import ServerConfig

KEYS = ("key-alpha", "key-beta")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def small():
    engine = make_engine(max_num_seqs=2)
    cfg = ServerConfig(api_keys=KEYS, max_queue=1, timeout=3.0, max_body_bytes=64 << 10)
    with running_server(engine, cfg) as srv:
        yield srv


@pytest.fixture
def c(small):
    with httpx.Client(base_url=small.url, timeout=30.0, headers=AUTH) as client:
        yield client


def test_auth_required_and_several_keys_accepted(small):
    with httpx.Client(base_url=small.url, timeout=30.0) as anon:
        assert_envelope(anon.get("/v1/models"), 401)
        assert_envelope(anon.post("/v1/completions", json={"prompt": "hi"}), 401)
        bad = anon.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
        assert assert_envelope(bad, 401)["code"] == "invalid_api_key"
        assert anon.get("/health").status_code == 200  # probes and scrapes need no key
        assert anon.get("/metrics").status_code == 200
    for key in KEYS:
        client = openai_client(small.url, api_key=key)
        r = client.completions.create(model="default", prompt="Hi", max_tokens=2)
        assert r.choices[0].text is not None
        client.close()
    import openai
    with pytest.raises(openai.AuthenticationError):
        openai_client(small.url, api_key="wrong").models.list()


def test_body_too_large_is_413(c, small):
    big = {"prompt": "x" * (100 << 10), "max_tokens": 1}
    err = assert_envelope(c.post("/v1/completions", json=big), 413)
    assert err["code"] == "request_too_large"
    assert c.get("/health").status_code == 200


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "hi", "echo": True}, 400, "echo"),
    ({"prompt": "hi", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [49152]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "hi", "n": 9}, 400, "n"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "tierlm_prompt_policy": "shrink"}, 400, "tierlm_prompt_policy"),
])
def test_completion_errors_use_envelope(c, body, status, param):
    assert_envelope(c.post("/v1/completions", json=body), status, param)


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
])
def test_chat_errors_use_envelope(c, body, status, param):
    assert_envelope(c.post("/v1/chat/completions", json=body), status, param)


def test_protocol_errors_use_envelope(c):
    assert_envelope(c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_envelope(c.get("/v1/nothing-here"), 404)
    assert_envelope(c.get("/v1/completions"), 405)


def test_timeout_is_408_and_frees_blocks(c, small):
    engine = small.aengine.engine
    t0 = time.monotonic()
    r = c.post("/v1/completions", json={"prompt": "Count:", "max_tokens": 1000, "ignore_eos": True})
    err = assert_envelope(r, 408)
    assert err["code"] == "timeout" and time.monotonic() - t0 < 10
    with c.stream("POST", "/v1/completions", json={"prompt": "Count:", "max_tokens": 1000, "ignore_eos": True,
                                                   "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    assert small.aengine.wait_idle(10)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_queue_overflow_503_with_retry_after_and_no_crash(c, small):
    def one(i):
        return c.post("/v1/completions", json={"prompt": f"Item {i}:", "max_tokens": 16, "ignore_eos": True,
                                               "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and codes.count(503) >= 5 and codes.count(200) >= 2, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1"
            assert assert_envelope(r, 503)["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    assert small.aengine.wait_idle(10)
    assert c.get("/health").json() == {"status": "ok"}
    assert c.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200
    metrics = c.get("/metrics").text
    assert 'tierlm_requests_total{endpoint="/v1/completions",status="503"}' in metrics
    assert 'tierlm_requests_rejected_total{reason="queue_full"}' in metrics
