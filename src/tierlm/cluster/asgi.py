"""One HTTP request through an in-process ASGI app, its response streamed as it is produced.

A replica runs tierlm's own server app (server/app.py: the OpenAI protocol, auth, limits, prompt policies,
metrics) unchanged; the cluster ingress hands it requests as (method, path, query, headers, body) and relays what it
sends back. httpx's ASGITransport would buffer a streamed response whole, so this drives the app directly:

    async for kind, value in call(app, "POST", "/v1/completions", b"", headers, body):
        kind == "start": value = (status, [(name, value), ...]);  kind == "body": value = bytes

Closing the iterator early (the client went away) tells the app the client disconnected (http.disconnect), so
the server aborts the request and frees its KV blocks, as it does behind uvicorn.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


async def call(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
               body: bytes) -> AsyncIterator[tuple[str, object]]:
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    disconnected = asyncio.Event()
    sent_body = False
    out: asyncio.Queue = asyncio.Queue()

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                yield "start", (msg["status"], [(bytes(k), bytes(v)) for k, v in msg.get("headers", [])])
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield "body", bytes(msg["body"])
                if not msg.get("more_body", False):
                    break
        await task
    finally:
        if not task.done():
            disconnected.set()  # the caller stopped reading: the app sees the client go
            try:
                await asyncio.wait_for(task, 30)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app's own error is not the caller's
                task.cancel()


async def fetch(app, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None,
                body: bytes = b"") -> tuple[int, bytes]:
    """One request through the app, its whole response: (status, body)."""
    status, chunks = 500, []
    async for kind, value in call(app, method, path, b"", headers or [], body):
        if kind == "start":
            status = value[0]
        else:
            chunks.append(value)
    return status, b"".join(chunks)
