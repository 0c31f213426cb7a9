"""32 concurrent streams through the official async client: all complete, and greedy outputs equal
offline LLM.generate on the same prompts. Client disconnects abort the request and free its KV blocks."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai

from tierlm import SamplingParams

PROMPTS = [f"Fact {i}: the number {i * 7} is" for i in range(16)] + \
          [f"Write one sentence about topic number {i}." for i in range(16)]
MAX_TOKENS = 12


async def _stream_all(url: str) -> list[tuple[str, str | None, int]]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120.0)

    async def one(prompt: str):
        text, finish, n = "", None, 0
        stream = await client.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                n = ch.usage.completion_tokens
        return text, finish, n

    try:
        return await asyncio.gather(*(one(p) for p in PROMPTS))
    finally:
        await client.close()


def test_32_concurrent_streams_equal_offline(server, default_llm):
    results = asyncio.run(_stream_all(server.url))
    ref = default_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert len(results) == 32
    for (text, finish, n), r in zip(results, ref):
        assert finish == r.outputs[0].finish_reason
        assert n == len(r.outputs[0].token_ids)
        assert text == r.outputs[0].text


def _wait_free(engine, idle: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.kv.num_free_blocks == idle and not engine.has_unfinished_requests():
            break
        time.sleep(0.02)
    return engine.kv.num_free_blocks


def test_disconnect_mid_stream_frees_blocks(server):
    engine = server.aengine.engine
    idle = engine.kv.num_blocks
    assert _wait_free(engine, idle) == idle
    body = {"model": "default", "prompt": "Tell me a very long story about a dragon." * 20, "max_tokens": 2000,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        with c.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = 0
            for line in resp.iter_lines():
                lines += bool(line.startswith("data:"))
                if lines >= 3:
                    break
            assert engine.kv.num_free_blocks < idle  # the request holds blocks while it streams
        # leaving the block closes the connection mid-stream
    assert _wait_free(engine, idle) == idle
    assert engine.counters["generation_tokens"] > 0


def test_disconnect_while_waiting_for_plain_response_frees_blocks(server):
    engine = server.aengine.engine
    idle = engine.kv.num_blocks
    body = {"model": "default", "prompt": "Count to one thousand:", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True}
    before = engine.counters["generation_tokens"]
    with httpx.Client(base_url=server.url, timeout=0.8) as c:
        try:
            c.post("/v1/completions", json=body)
            raise AssertionError("the request should not finish within the client timeout")
        except httpx.TimeoutException:
            pass
    assert _wait_free(engine, idle) == idle
    assert engine.counters["generation_tokens"] - before < 1000  # aborted long before max_tokens
