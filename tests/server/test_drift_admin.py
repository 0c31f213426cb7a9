"""The drift guard behind `tierlm serve`: a server whose FP8 scales are deliberately broken trips on its own
traffic (official openai client), says so in GET /health and /metrics, serves new requests in fp32, and
goes back to the candidate format only through POST /admin/drift/rearm with the API key (401 without a
key, 403 when the server has none configured)."""
from __future__ import annotations

import httpx
import pytest
from helpers.engine_bugs import broken_static_kv_scales
from server_testing import assert_envelope, openai_client, running_server

from tierlm.config import CacheConfig, DriftGuardConfig, EngineConfig
from tierlm.engine.llm_engine import LLMEngine
from tierlm.server.server_config import ServerConfig

KEY = "drift-admin-key"


@pytest.fixture(scope="module")
def broken_engine(server_engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    scales = broken_static_kv_scales(server_engine, tmp / "scales.json")
    engine = LLMEngine(EngineConfig(
        cache=CacheConfig(num_blocks=256, kv_format="fp8_e4m3_static", kv_scales_path=str(scales)),
        drift_guard=DriftGuardConfig(fraction=1.0, min_tokens=32, window_tokens=256,
                                     state_path=str(tmp / "rollback.json"))))
    yield engine
    engine.close()


def metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_trip_health_metrics_and_rearm_behind_the_key(broken_engine):
    with running_server(broken_engine, ServerConfig(timeout=60.0, api_keys=(KEY,))) as srv, \
            httpx.Client(base_url=srv.url, timeout=60.0) as http:
        drift = http.get("/health").json()["drift"]
        assert drift["tripped"] is False and drift["active_kv_format"] == "fp8_e4m3_static", drift
        client = openai_client(srv.url, api_key=KEY)
        for i in range(3):
            client.completions.create(model="default", prompt=f"Count to ten, attempt {i}:", max_tokens=16,
                                      temperature=0.0, extra_body={"ignore_eos": True})
        assert broken_engine.drift_guard.wait_idle(120)
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"  # still serving, in the safe format
        drift = health.json()["drift"]
        assert drift["tripped"] is True and "mean KL" in drift["reason"] and drift["window"]["tokens"] >= 32, drift
        m = http.get("/metrics").text
        assert metric(m, "tierlm_drift_guard_tripped") == 1.0 and metric(m, "tierlm_drift_window_kl_mean") > 0.5

        client.completions.create(model="default", prompt="Hello", max_tokens=4)  # runs after the switch
        assert http.get("/health").json()["drift"]["active_kv_format"] == "fp32"
        assert metric(http.get("/metrics").text, "tierlm_drift_guard_safe_format_active") == 1.0

        assert_envelope(http.post("/admin/drift/rearm"), 401)
        assert_envelope(http.post("/admin/drift/rearm", headers={"Authorization": "Bearer wrong"}), 401)
        r = http.post("/admin/drift/rearm", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json() == {"rearmed": True, "was_tripped": True,
                                                     "kv_format": "fp8_e4m3_static"}, r.text
        assert http.get("/health").json()["drift"]["tripped"] is False
        client.completions.create(model="default", prompt="Hello", max_tokens=4)
        assert http.get("/health").json()["drift"]["active_kv_format"] == "fp8_e4m3_static"


def test_admin_routes_need_a_configured_key(broken_engine, server_engine):
    with running_server(broken_engine, ServerConfig(timeout=60.0)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60.0) as http:
        err = assert_envelope(http.post("/admin/drift/rearm"), 403)
        assert "--api-key" in err["message"] and err["code"] == "admin_needs_api_key"
    with running_server(server_engine, ServerConfig(timeout=60.0, api_keys=(KEY,))) as srv, \
            httpx.Client(base_url=srv.url, timeout=60.0) as http:
        assert "drift" not in http.get("/health").json()
        err = assert_envelope(http.post("/admin/drift/rearm", headers={"Authorization": f"Bearer {KEY}"}), 400)
        assert err["code"] == "drift_guard_off" and "--drift-guard" in err["message"]
