"""A server whose engine has a small device pool and a host KV tier (built from the `tierlm serve` flags):
a prompt evicted from the device comes back from host memory, `usage.prompt_tokens_details` says so
(plain and streamed, completions and chat), /metrics exports the tier metrics and /health the tier health."""
from __future__ import annotations

import argparse
import re

import httpx
import pytest
from server_testing import openai_client, running_server

from tierlm.engine.llm_engine import LLMEngine
from tierlm.server import command

NUM_BLOCKS = 24  # 384 tokens: three ~100-token prompts evict the first one from the device


@pytest.fixture(scope="module")
def tier_server():
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    args = p.parse_args(["--num-kv-blocks", str(NUM_BLOCKS), "--host-cache-memory", "64MiB", "--timeout", "60"])
    engine = LLMEngine(command.engine_config(args))
    assert engine.tiers is not None
    try:
        with running_server(engine, command.server_config(args)) as srv:
            yield srv
    finally:
        engine.close()


@pytest.fixture(scope="module")
def client(tier_server):
    c = openai_client(tier_server.url)
    yield c
    c.close()


def text(topic: str) -> str:
    return " ".join(f"Fact {i} about {topic}: it is worth a careful sentence of its own." for i in range(7))


def by_tier(usage) -> dict[str, int]:
    details = usage.prompt_tokens_details
    return details.model_extra["cached_tokens_by_tier"]


def test_a_prompt_evicted_from_the_device_comes_back_from_host(client, tier_server):
    prompt = text("rivers")
    first = client.completions.create(model="default", prompt=prompt, max_tokens=2, temperature=0)
    assert by_tier(first.usage) == {"device": 0, "host": 0}
    for topic in ("mountains", "deserts", "glaciers"):  # each needs ~7 of the 24 blocks: the first prompt is evicted
        client.completions.create(model="default", prompt=text(topic), max_tokens=2, temperature=0)
    chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    split = by_tier(usage)
    assert split["host"] > 0 and split["host"] % 16 == 0, split
    assert sum(split.values()) == usage.prompt_tokens_details.cached_tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == first.choices[0].text

    metrics = httpx.get(tier_server.url + "/metrics").text
    hit = re.search(r'^tierlm_tier_hit_tokens_total\{tier="host"\} (\S+)$', metrics, re.M)
    assert hit and float(hit.group(1)) >= split["host"]
    for name in ("tierlm_tier_lookups_total", "tierlm_tier_found_total", "tierlm_tier_loaded_bytes_total",
                 "tierlm_tier_stored_bytes_total", "tierlm_tier_evictions_total", "tierlm_tier_corrupt_entries_total",
                 "tierlm_tier_errors_total", "tierlm_tier_capacity_bytes", "tierlm_tier_used_bytes",
                 "tierlm_tier_load_seconds_count"):
        assert f'{name}{{tier="host"}}' in metrics, name
    assert 'tierlm_tier_healthy{tier="host"} 1.0' in metrics
    cap = re.search(r'^tierlm_tier_capacity_bytes\{tier="host"\} (\S+)$', metrics, re.M)
    assert float(cap.group(1)) == 64 << 20
    assert 'tierlm_tier_load_seconds_bucket{le="+Inf",tier="host"}' in metrics
    for reason in ("cost", "timeout", "corrupt"):
        assert f'tierlm_tier_fallback_tokens_total{{reason="{reason}"}}' in metrics
    assert "tierlm_tier_offloaded_blocks_total" in metrics and "tierlm_preemptions_offloaded_total" in metrics
    loaded = re.search(r'^tierlm_tier_loaded_bytes_total\{tier="host"\} (\S+)$', metrics, re.M)
    assert float(loaded.group(1)) > 0


def test_chat_usage_has_the_split(client):
    msgs = [{"role": "system", "content": text("oceans")}, {"role": "user", "content": "Name one."}]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=2, temperature=0)
    split = by_tier(r.usage)
    assert set(split) == {"device", "host"} and sum(split.values()) == r.usage.prompt_tokens_details.cached_tokens


def test_health_lists_the_tiers(tier_server):
    body = httpx.get(tier_server.url + "/health").json()
    assert body["status"] == "ok"
    assert body["tiers"]["host"]["healthy"] is True and body["tiers"]["host"]["capacity_bytes"] == 64 << 20
