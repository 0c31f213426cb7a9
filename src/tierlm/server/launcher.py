"""Running the app on uvicorn: in the foreground (`tierlm serve`) or on a background thread (tests, bench).

Shutdown is graceful: on SIGINT/SIGTERM (or `stop()`), the gate starts refusing new API requests,
uvicorn stops listening, waits up to `graceful_timeout` for in-flight requests to finish, then the
app's lifespan stops the engine loop.
"""
from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from tierlm.server.server_config import ServerConfig


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that tells the app it is draining as soon as an exit is asked for."""

    def __init__(self, app: FastAPI, config: ServerConfig, log_level: str = "info", access_log: bool = True):
        self.app_state = app.state.tierlm
        super().__init__(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                        access_log=access_log, timeout_graceful_shutdown=int(config.graceful_timeout),
                                        lifespan="on"))

    def handle_exit(self, sig, frame) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)


def serve_forever(app: FastAPI, config: ServerConfig, log_level: str = "info") -> bool:
    """Serve until SIGINT/SIGTERM. The engine loop runs on this (main) thread, the one that loaded the
    model (see AsyncEngine.claim_current_thread); uvicorn runs on a second thread. Returns False when
    uvicorn never started (e.g. the port is in use; uvicorn has logged why)."""
    aengine = app.state.aengine
    server = DrainingServer(app, config, log_level)
    aengine.claim_current_thread()
    web = threading.Thread(target=server.run, name="tierlm-uvicorn")

    def watch() -> None:  # uvicorn ended (shutdown finished, or it failed to start): stop the engine too
        web.join()
        aengine.shutdown()

    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        web.start()
        threading.Thread(target=watch, daemon=True, name="tierlm-watch").start()
        aengine.run_loop()
        web.join()
        return bool(server.started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """The app on a loopback socket (port 0 = ephemeral) served from a daemon thread.

        with BackgroundServer(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        cfg = config or ServerConfig()
        self.server = DrainingServer(app, ServerConfig(host=self.host, port=self.port, graceful_timeout=cfg.graceful_timeout),
                                     log_level=log_level, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="tierlm-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.app.state.tierlm.draining = True
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
