"""RequestGate: ASGI middleware in front of every route.

In order: count the response status per endpoint (metrics); refuse new API requests while the server
drains for shutdown (503); check the API key on /v1/* when keys are configured (401); refuse /admin/*
unless keys are configured (403) and the request carries one (401); read the body
up to max_body_bytes (413 past it) and replay it to the app, after which `receive` is the server's own,
so routes can still wait for the client's disconnect.
"""
from __future__ import annotations

import hmac

from tierlm.server.errors import APIError
from tierlm.server.metrics import ServerMetrics
from tierlm.server.server_config import ServerConfig

_DRAIN_CAP = 16  # a too-large body is read and discarded up to this many times the limit, then dropped


class ServerState:
    def __init__(self) -> None:
        self.draining = False


class RequestGate:
    def __init__(self, app, config: ServerConfig, metrics: ServerMetrics, state: ServerState):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.state = state
        self._keys = [k.encode() for k in config.api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._gated(scope, receive, send_counted, path)
        finally:
            self.metrics.observe_status(path, status)

    async def _gated(self, scope, receive, send, path: str):
        api = path.startswith("/v1/")
        if api and self.state.draining:
            return await self._refuse(scope, receive, send, APIError(
                503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"}))
        if path.startswith("/admin/"):
            if not self._keys:
                return await self._refuse(scope, receive, send, APIError(
                    403, "admin routes need an API key: start the server with --api-key KEY (or TIERLM_API_KEYS)",
                    code="admin_needs_api_key"))
            if not self._authorized(scope):
                return await self._refuse(scope, receive, send, APIError(
                    401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
        if api and self._keys and not self._authorized(scope):
            return await self._refuse(scope, receive, send, APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"}))
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.config.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await self._refuse(scope, receive, send, _too_large(limit))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > limit:
                return await self._refuse(scope, receive, send, _too_large(limit), already=size, more=more)
            chunks.append(body)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    def _authorized(self, scope) -> bool:
        auth = _header(scope, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        return any(hmac.compare_digest(token, k) for k in self._keys)

    async def _refuse(self, scope, receive, send, err: APIError, already: int = 0, more: bool = True):
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
            cap = _DRAIN_CAP * self.config.max_body_bytes
            while more and already < cap:  # read the rest so the client sees the answer, not a reset
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                already += len(message.get("body", b""))
                more = message.get("more_body", False)
        await err.response()(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large",
                    headers={"Connection": "close"})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


def _content_length(scope) -> int | None:
    v = _header(scope, b"content-length")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None
