"""`tierlm serve` in a subprocess on a free loopback port, for driving it over HTTP like any other server.

    with ServerProcess(["--model", "default", "--no-prefix-caching"]) as srv:
        HttpDriver(srv.url, tokenizer).run(requests, ArrivalPlan(concurrency=4))

start(): pick a free port on 127.0.0.1, run `python -m tierlm.server --host 127.0.0.1 --port P --log-level
warning --timeout 0 FLAGS` (FLAGS last, so they override those defaults; the server's stderr goes to a
temporary file, never a pipe that could fill and stall it), then poll GET /health until it answers 200.
If the port was taken between picking and binding, retry on another. stop(): SIGTERM (the server drains
in-flight requests and exits), SIGKILL if it has not exited after `stop_timeout_s`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tierlm.core.errors import TierlmError

_PORT_IN_USE = "could not serve on"  # what `tierlm serve` prints when uvicorn cannot bind


class ServerStartError(TierlmError):
    """`tierlm serve` exited or never became healthy."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, engine_flags: list[str], *, host: str = "127.0.0.1", startup_timeout_s: float = 180.0,
                 stop_timeout_s: float = 30.0, env: dict[str, str] | None = None, module: str = "tierlm.server"):
        self.flags = list(engine_flags)
        self.module = module  # tierlm.cluster: the same server, able to run --replicas N
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    @property
    def url(self) -> str:
        if self.proc is None:
            raise RuntimeError("ServerProcess.url before start(): use it as a context manager or call start()")
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        if self.proc is not None:
            return
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except ServerStartError as e:
                if _PORT_IN_USE not in str(e) or attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        import httpx

        self.port = free_port(self.host)
        cmd = [sys.executable, "-m", self.module, "--host", self.host, "--port", str(self.port),
               "--log-level", "warning", "--timeout", "0", *self.flags]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, tail = self.proc.returncode, self.stderr_tail()
                self._reset()
                raise ServerStartError(f"`tierlm serve {' '.join(self.flags)}` exited with code {rc}: {tail}",
                                       "fix the flags or the model path the server's message names")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tail = self.stderr_tail()
        self.stop()
        raise ServerStartError(f"`tierlm serve` did not become healthy in {self.startup_timeout_s:.0f} s: {tail}",
                               "raise startup_timeout_s for a large model, or check the model loads with "
                               "`tierlm generate`")

    def stderr_tail(self, lines: int = 6) -> str:
        """The server's last `lines` stderr lines, on one line (" | " between them)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(no output)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reset()

    def _reset(self) -> None:
        if self._log is not None:
            self._log.close()
        self.proc, self._log = None, None
