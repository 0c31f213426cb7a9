"""A bounded schemathesis run against the server's own OpenAPI schema: no input gives a 5xx.

Cases come from schemathesis' strategies for every operation, in both positive (schema-valid) and
negative (schema-violating) modes, driven by hypothesis with a fixed example count and seed, plus a
wall-clock cap. The server is small on purpose (context 64 tokens, 1.5 s timeout, 4 running
sequences) so every generated request ends fast. 503 (queue full) is an allowed answer."""
from __future__ import annotations

import time

import pytest
import schemathesis
from server_testing import make_engine, running_server
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tierlm.server.server_config import ServerConfig

EXAMPLES = 30  # per operation and mode
TIME_CAP_S = 75.0


@pytest.fixture(scope="module")
def fuzz_server():
    engine = make_engine(max_num_seqs=4, max_model_len=64)
    with running_server(engine, ServerConfig(timeout=1.5, max_queue=4)) as srv:
        yield srv


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_no_server_errors(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in ops} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"}
    t0 = time.monotonic()
    calls, failures = [0], []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @seed(1234)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                if time.monotonic() - t0 > TIME_CAP_S:
                    return
                response = case.call(base_url=fuzz_server.url, timeout=30)
                calls[0] += 1
                if response.status_code >= 500 and response.status_code != 503:
                    failures.append((op.label, mode.value, case.body, response.status_code, response.text[:300]))

            try:
                run()
            except Unsatisfiable:  # nothing to break: a GET or an admin POST without parameters or body
                assert mode is GenerationMode.NEGATIVE and (op.method.upper() == "GET" or op.path.startswith("/admin/"))
    assert not failures, failures[:5]
    assert calls[0] >= 40
    assert fuzz_server.aengine.wait_idle(10)
