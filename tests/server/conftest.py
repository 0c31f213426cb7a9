"""Server fixtures: real uvicorn servers on 127.0.0.1 (ephemeral ports), one per module, each around its
own AsyncEngine. Engines are loaded once per configuration and shared; a server's engine is idle
(no request in flight) when its module ends."""
from __future__ import annotations

import httpx
import pytest
from server_testing import make_engine, running_server

from tierlm.engine.llm_engine import LLMEngine
from tierlm.server.server_config import ServerConfig


@pytest.fixture(scope="session")
def server_engine() -> LLMEngine:
    return make_engine()


@pytest.fixture(scope="module")
def server(server_engine):
    """The default server: no auth, reject policy, 60 s timeout."""
    with running_server(server_engine, ServerConfig(timeout=60.0)) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c
