"""The in-process ASGI call a replica serves through: the server app's answers (JSON, SSE streamed chunk by chunk,
errors) come back as they do over uvicorn, and a caller that stops reading aborts the request."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tierlm.cluster.asgi import call
from tierlm.engine.async_engine import AsyncEngine
from tierlm.server.app import build_app
from tierlm.server.server_config import ServerConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from server_testing import make_engine  # noqa: E402


@pytest.fixture(scope="module")
def app():
    engine = make_engine(max_num_seqs=8)
    aengine = AsyncEngine(engine)
    aengine.start()
    yield build_app(aengine, ServerConfig(api_keys=("k",))), engine
    aengine.shutdown()


def run(app, method, path, body=None, key="k"):
    async def go():
        headers = [(b"content-type", b"application/json")] + ([(b"authorization", f"Bearer {key}".encode())]
                                                             if key else [])
        parts = []
        async for kind, value in call(app, method, path, b"", headers, json.dumps(body).encode() if body else b""):
            parts.append((kind, value))
        return parts
    return asyncio.run(go())


def test_json_answer_and_auth(app):
    a, _ = app
    parts = run(a, "POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 5,
                                                "temperature": 0})
    (kind, (status, headers)), body = parts[0], b"".join(v for k, v in parts[1:])
    assert kind == "start" and status == 200
    reply = json.loads(body)
    assert reply["choices"][0]["text"].startswith(" Paris") and reply["usage"]["completion_tokens"] == 5
    assert (b"content-type", b"application/json") in headers
    parts = run(a, "POST", "/v1/completions", {"prompt": "x"}, key=None)
    assert parts[0][1][0] == 401


def test_sse_streams_chunk_by_chunk(app):
    a, _ = app
    parts = run(a, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                                "stream": True, "ignore_eos": True})
    assert parts[0][1][0] == 200
    chunks = [v for k, v in parts[1:]]
    events = [line for c in chunks for line in c.decode().splitlines() if line.startswith("data:")]
    assert len(chunks) >= 6 and events[-1] == "data: [DONE]" and len(events) >= 7


def test_a_caller_that_stops_reading_aborts_the_request(app):
    a, engine = app

    async def go():
        it = call(a, "POST", "/v1/completions", b"", [(b"authorization", b"Bearer k"),
                                                      (b"content-type", b"application/json")],
                  json.dumps({"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}).encode())
        n = 0
        async for kind, _ in it:
            n += kind == "body"
            if n == 3:
                break
        await it.aclose()
        for _ in range(100):
            if not engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.05)
        return False
    assert asyncio.run(go())


def test_fetch_and_the_merged_metrics_of_two_replicas(app):
    """The ingress's /metrics: each replica's exposition (the server's own) labelled with its replica id, plus the
    ingress's families; nothing lost or summed across replicas."""
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    from tierlm.cluster.asgi import fetch
    from tierlm.cluster.ingress import merged_metrics

    a, _ = app
    status, body = asyncio.run(fetch(a, "GET", "/health"))
    assert status == 200 and json.loads(body)["status"] == "ok"
    run(a, "POST", "/v1/completions", {"prompt": "One more", "max_tokens": 3})
    status, text = asyncio.run(fetch(a, "GET", "/metrics"))
    assert status == 200
    first = text.decode()
    run(a, "POST", "/v1/completions", {"prompt": "And another", "max_tokens": 3})
    second = asyncio.run(fetch(a, "GET", "/metrics"))[1].decode()  # the same server later: more requests

    def requests_of(exposition: str, **labels) -> float:
        return sum(x.value for f in text_string_to_metric_families(exposition) for x in f.samples
                   if x.name == "tierlm_requests_total" and all(x.labels.get(k) == v for k, v in labels.items()))

    merged = merged_metrics([{"id": "r1", "metrics": first}, {"id": "r2", "metrics": second}],
                            [CounterMetricFamily("tierlm_cluster_retries", "retries", value=3)]).decode()
    assert requests_of(merged, replica="r1") == requests_of(first) > 0
    assert requests_of(merged, replica="r2") == requests_of(second) > requests_of(first)
    assert "tierlm_cluster_retries_total 3.0" in merged
    assert merged.count("# TYPE tierlm_requests_total ") == 1  # one family, both replicas' samples in it


def test_replica_resources():
    from tierlm.cluster.deploy import replica_actor_options

    assert replica_actor_options() == {"num_cpus": 1}
    assert replica_actor_options(4, 0.5) == {"num_cpus": 4, "num_gpus": 0.5}
