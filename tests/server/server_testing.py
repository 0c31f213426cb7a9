"""Helpers shared by the server tests (imported by name: tests/ has no packages)."""
from __future__ import annotations

import contextlib

import httpx

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig
from tierlm.engine.async_engine import AsyncEngine
from tierlm.engine.llm_engine import LLMEngine
from tierlm.server.app import build_app
from tierlm.server.launcher import BackgroundServer
from tierlm.server.server_config import ServerConfig

KV_BYTES = 256 << 20


def make_engine(max_num_seqs: int = 64, max_model_len: int | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(max_model_len=max_model_len, cache=CacheConfig(memory_bytes=KV_BYTES),
                                  scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)))


@contextlib.contextmanager
def running_server(engine: LLMEngine, config: ServerConfig | None = None):
    config = config or ServerConfig()
    aengine = AsyncEngine(engine)
    app = build_app(aengine, config)
    srv = BackgroundServer(app, config)
    srv.aengine = aengine
    with srv:
        yield srv
    assert not engine.has_unfinished_requests()


def openai_client(url: str, api_key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60.0, **kw)


def assert_envelope(resp: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    return err
