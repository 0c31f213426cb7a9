"""`tierlm serve` argument handling: the parser hook, keys from flags and the environment, no torch on import."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tierlm.core.errors import InvalidParameterError
from tierlm.server import command


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tierlm")
    command.add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["serve", *argv])


def test_defaults_and_func():
    a = parse([])
    assert (a.host, a.port, a.prompt_policy, a.max_queue, a.timeout) == ("127.0.0.1", 8000, "reject", 256, 600.0)
    assert a.func is command.run
    cfg = command.server_config(a)
    assert cfg.model_name == "default" and cfg.api_keys == () and cfg.max_body_bytes == 8 << 20


def test_flags(monkeypatch):
    monkeypatch.setenv("TIERLM_API_KEYS", "env-1, env-2,,key-a")
    a = parse(["--model", "default", "--port", "9001", "--api-key", "key-a", "--api-key", "key-b",
               "--max-queue", "3", "--timeout", "0", "--prompt-policy", "summarize", "--max-body-bytes", "1MiB",
               "--kv-cache-memory", "512MiB", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
               "--no-prefix-caching", "--dtype", "fp32"])
    cfg = command.server_config(a)
    assert cfg.api_keys == ("key-a", "key-b", "env-1", "env-2")
    assert "key-a" not in repr(cfg)  # keys never show up in logs of the config
    assert (cfg.port, cfg.max_queue, cfg.timeout, cfg.prompt_policy, cfg.max_body_bytes) == \
        (9001, 3, None, "summarize", 1 << 20)
    e = command.engine_config(a)
    assert e.model is None and e.dtype == "fp32" and e.cache.memory_bytes == 512 << 20
    assert not e.cache.enable_prefix_caching and e.scheduler.max_num_seqs == 8
    assert e.scheduler.max_num_batched_tokens == 256


def test_drift_guard_flags():
    assert not command.engine_config(parse([])).drift_guard.enabled
    e = command.engine_config(parse(["--kv-format", "fp8_e4m3", "--drift-guard", "0.05", "--drift-guard-max-kl",
                                      "0.2", "--drift-guard-min-top1", "0.8", "--drift-guard-window", "128",
                                      "--drift-state", "/tmp/s.json", "--drift-rearm"])).drift_guard
    assert (e.fraction, e.max_kl_mean, e.min_top1_agreement, e.window_tokens, e.min_tokens, e.state_path, e.rearm) \
        == (0.05, 0.2, 0.8, 128, 128, "/tmp/s.json", True)
    with pytest.raises(InvalidParameterError, match="add --drift-guard"):
        command.engine_config(parse(["--drift-rearm"]))
    with pytest.raises(InvalidParameterError, match="fraction"):
        command.engine_config(parse(["--drift-guard", "2"]))


def test_sparse_flags():
    assert not command.engine_config(parse([])).sparse.enabled
    e = command.engine_config(parse(["--sparse", "quest", "--sparse-budget", "512", "--sparse-sink", "32",
                                      "--sparse-window", "128", "--sparse-dense-layers", "3"])).sparse
    assert (e.selector, e.budget_tokens, e.sink_tokens, e.window_tokens, e.dense_layers) == ("quest", 512, 32, 128, 3)
    with pytest.raises(InvalidParameterError, match="sparse-budget"):
        command.engine_config(parse(["--sparse", "quest", "--sparse-budget", "64"]))
    with pytest.raises(SystemExit):
        parse(["--sparse", "nsa"])


def test_bad_policy_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse(["--prompt-policy", "shrink"])


def test_import_does_not_load_torch():
    code = "import sys, tierlm.server.command; sys.exit('torch' in sys.modules or 'fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_serve_subprocess_answers_and_stops_on_sigterm(tmp_path):
    """The real command: engine loop on the main thread, uvicorn beside it, SIGTERM drains and exits 0."""
    import os
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TIERLM_API_KEYS="secret-key")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tierlm.server", "--port", str(port), "--kv-cache-memory", "128MiB",
                             "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                       headers={"Authorization": "Bearer secret-key"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, timeout=30).status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    assert "secret-key" not in log.read()
