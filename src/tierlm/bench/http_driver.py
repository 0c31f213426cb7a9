"""The HTTP driver: any OpenAI-compatible server by URL (ours, vLLM, llama.cpp's server), streaming.

Each request is POST {url}/v1/completions with `stream: true`, greedy (`temperature: 0`), EOS ignored
(`ignore_eos`, which vLLM and llama.cpp's server both honour) and `max_tokens`; the prompt is the
workload's token ids decoded to text. Server-sent events are read line by line: every `data:` chunk
whose choice carries text stamps one token arrival (a chunk holding several tokens stamps one; the
token count then comes from `usage.completion_tokens`, asked for with
`stream_options.include_usage`). `usage.prompt_tokens_details.cached_tokens`, where the server
sends it, gives the prefix-cache hit rate.

llama.cpp: start `llama-server -m model.gguf --port 8080` and pass `--peer-url http://127.0.0.1:8080`.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tierlm.bench.arrivals import ArrivalPlan, arrival_times
from tierlm.bench.metrics import RequestRecord
from tierlm.bench.workloads import BenchRequest, TextTokenizer
from tierlm.core.errors import TierlmError


class ServerUnreachableError(TierlmError):
    """The benchmark's server URL does not answer."""


def _httpx():
    try:
        import httpx
    except ImportError:
        raise TierlmError("the HTTP driver needs httpx", "pip install httpx") from None
    return httpx


def check_server(url: str, timeout: float = 3.0, api_key: str | None = None) -> list[str]:
    """Model ids the server lists at /v1/models ([] if it lists none). Raises ServerUnreachableError."""
    httpx = _httpx()
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ServerUnreachableError(f"server URL {url!r} is not http(s)", "pass e.g. http://127.0.0.1:8080")
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        resp = httpx.get(f"{base}/v1/models", timeout=timeout, headers=headers)
    except httpx.HTTPError as e:
        raise ServerUnreachableError(f"cannot reach the server at {base} ({type(e).__name__})",
                                     "start it first or fix --peer-url") from None
    if resp.status_code != 200:
        return []
    try:
        return [m["id"] for m in resp.json().get("data", []) if "id" in m]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


@dataclass
class HttpRun:
    records: list[RequestRecord] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    complete: bool = False

    @property
    def wall_s(self) -> float:
        return max(0.0, self.end - self.start)


class HttpDriver:
    def __init__(self, url: str, tokenizer: TextTokenizer, model: str | None = None, timeout_s: float = 600.0,
                 api_key: str | None = None):
        self.base = url.rstrip("/")
        self.tokenizer = tokenizer
        self.model = model
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def run(self, requests: list[BenchRequest], plan: ArrivalPlan, run: HttpRun | None = None,
            on_request_done: Callable[[], None] | None = None) -> HttpRun:
        run = run if run is not None else HttpRun()
        prompts = [self.tokenizer.decode(list(r.prompt_ids)) for r in requests]
        asyncio.run(self._run(requests, prompts, plan, run, on_request_done))
        return run

    async def _run(self, requests, prompts, plan, run, on_done) -> None:
        httpx = _httpx()
        offsets = arrival_times(plan, [r.arrival_s for r in requests])
        limit = plan.concurrency or len(requests)
        gate = asyncio.Semaphore(limit)
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self.headers) as client:
            run.start = time.monotonic()

            async def one(i: int) -> None:
                if offsets is not None:
                    await asyncio.sleep(max(0.0, run.start + offsets[i] - time.monotonic()))
                async with gate:
                    sent = run.start + offsets[i] if offsets is not None else time.monotonic()
                    rec = RequestRecord(sent=sent, num_input=len(requests[i].prompt_ids), index=i)
                    run.records.append(rec)
                    await self._send(client, prompts[i], requests[i].max_tokens, rec)
                if on_done:
                    on_done()

            try:
                await asyncio.gather(*(one(i) for i in range(len(requests))))
                run.complete = True
            finally:
                run.end = time.monotonic()

    async def _send(self, client, prompt: str, max_tokens: int, rec: RequestRecord) -> None:
        httpx = _httpx()
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        try:
            async with client.stream("POST", f"{self.base}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:200]
                    rec.error = f"HTTP {resp.status_code}: {text}"
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._on_chunk(json.loads(data), rec, time.monotonic())
        except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError) as e:  # incl. malformed chunks
            rec.error = f"{type(e).__name__}: {e}"
            return
        rec.done = time.monotonic()
        if not rec.token_times:
            rec.error = "the stream carried no tokens"

    @staticmethod
    def _on_chunk(obj: dict, rec: RequestRecord, now: float) -> None:
        if "error" in obj:
            rec.error = str(obj["error"])[:200]
            return
        for choice in obj.get("choices") or []:
            if choice.get("text"):
                rec.token_times.append(now)
                rec.text += choice["text"]
        usage = obj.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                rec.num_output = int(usage["completion_tokens"])
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                rec.num_cached = int(details["cached_tokens"])
