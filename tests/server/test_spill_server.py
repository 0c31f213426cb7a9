"""`tierlm serve` with sparse spilling: the context the server advertises and accepts is the pool plus the spill
store, so a prompt longer than the device pool is served (official openai client, real HTTP on loopback)."""
from __future__ import annotations

from server_testing import openai_client, running_server

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig, SparseConfig
from tierlm.engine.llm_engine import LLMEngine


def test_a_prompt_longer_than_the_pool_is_served():
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=32), scheduler=SchedulerConfig(max_num_batched_tokens=256),
                                    sparse=SparseConfig(selector="quest", budget_tokens=256, spill_bytes=64 << 20)))
    pool_tokens = engine.kv.num_blocks * engine.kv.block_size
    assert engine.max_model_len > 2 * pool_tokens
    with running_server(engine) as srv:
        client = openai_client(srv.url)
        assert client.models.list().data[0].model_extra["max_model_len"] == engine.max_model_len
        prompt = [100 + i % 500 for i in range(pool_tokens + 300)]
        out = client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0.0)
        assert out.choices[0].finish_reason == "length" and out.usage.prompt_tokens == len(prompt)
    assert engine.spill.stats()["spilled"] > 0
    engine.close()
