"""Graceful shutdown: an in-flight stream finishes; new connections are refused; the engine ends idle."""
from __future__ import annotations

import threading
import time

import httpx
from server_testing import running_server

from tierlm.server.server_config import ServerConfig


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(server_engine):
    with running_server(server_engine, ServerConfig(graceful_timeout=30)) as srv:
        url = srv.url
        events: list[str] = []
        stopper = threading.Thread(target=srv.stop)
        with httpx.Client(base_url=url, timeout=30.0) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Count slowly:", "max_tokens": 40,
                                                           "ignore_eos": True, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            stopper.start()
                            time.sleep(0.3)  # the listener is closed by now
                            try:
                                refused = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5)
                                status = refused.status_code
                            except httpx.ConnectError:
                                status = "refused"
                            assert status in ("refused", 503)
        stopper.join(30)
        assert not srv.thread.is_alive()
    assert events[-1] == "[DONE]"
    assert '"finish_reason":"length"' in events[-2]
    assert not srv.aengine.is_running
