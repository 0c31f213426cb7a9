"""The HTTP driver: any OpenAI-compatible server by URL (ours, vLLM, llama.cpp's server), streaming.

Each request is POST {url}/v1/completions with `stream: true`, greedy (`temperature: 0`), EOS ignored
(`ignore_eos`, which vLLM and llama.cpp's server both honour) and `max_tokens`; the prompt is the
workload's token ids decoded to text. Server-sent events are read line by line: every `data:` chunk
whose choice carries text stamps one token arrival (a chunk holding several tokens stamps one; the
token count then comes from `usage.completion_tokens`, asked for with
`stream_options.include_usage`). `usage.prompt_tokens_details.cached_tokens`, where the server
sends it, gives the prefix-cache hit rate.

Dependent requests (multi-turn rounds after the first) are sent once the request they continue has
finished (arrivals.ArrivalQueue, as in-process), with the prompt workloads.resolve_prompt builds from
that request's prompt ids and reply ids. The reply ids are the server's own where it streams them
(`token_ids` in each choice: vLLM's `return_token_ids` extension, asked for on requests that others
continue), else the streamed reply text encoded with the bench's tokenizer, which is what a chat
client that keeps the reply as text sends back (a few tokens may differ from the server's own). A
dependent request whose parent failed is recorded as failed without being sent.

llama.cpp: start `llama-server -m model.gguf --port 8080` and pass `--peer-url http://127.0.0.1:8080`.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tierlm.bench.arrivals import ArrivalPlan, ArrivalQueue
from tierlm.bench.metrics import RequestRecord
from tierlm.bench.workloads import BenchRequest, TextTokenizer, resolve_prompt
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
        # independent prompts are decoded before the clock starts; dependent ones when their parent is done
        prompts = {i: self.tokenizer.decode(list(r.prompt_ids)) for i, r in enumerate(requests) if not r.dependent}
        asyncio.run(self._run(requests, prompts, plan, run, on_request_done))
        return run

    def reply_ids(self, rec: RequestRecord) -> list[int]:
        """A finished request's output token ids: the server's where it streamed them, else its text encoded."""
        if rec.token_ids is not None:
            return rec.token_ids
        return self.tokenizer.encode(rec.text, add_special_tokens=False)

    async def _run(self, requests, prompts, plan, run, on_done) -> None:
        httpx = _httpx()
        queue = ArrivalQueue(plan, [r.arrival_s for r in requests], [r.history_from for r in requests])
        continued = {r.history_from for r in requests if r.dependent}  # requests whose reply ids are needed
        limit = plan.concurrency or len(requests)
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        records: dict[int, RequestRecord] = {}
        tasks: dict[asyncio.Task, int] = {}
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self.headers) as client:
            run.start = time.monotonic()
            queue.start(run.start)
            try:
                while queue or tasks:
                    now = time.monotonic()
                    while (nxt := queue.pop(now, len(tasks))) is not None:
                        i, sent = nxt
                        req = requests[i]
                        if req.dependent:
                            parent = records[req.history_from]
                            ids = resolve_prompt(req, parent.prompt_ids, self.reply_ids(parent))
                            text = self.tokenizer.decode(ids)
                        else:
                            ids, text = req.prompt_ids, prompts[i]
                        rec = RequestRecord(sent=sent, num_input=len(ids), index=i, prompt_ids=ids)
                        run.records.append(rec)
                        records[i] = rec
                        task = asyncio.create_task(self._send(client, text, req.max_tokens, rec, i in continued))
                        tasks[task] = i
                    wait = queue.wait_s(time.monotonic(), len(tasks))
                    if not tasks:
                        if wait is None:  # nothing queued and nothing in flight: no request can be sent
                            raise RuntimeError("bench: requests left that wait on requests that never ran")
                        await asyncio.sleep(wait)
                        continue
                    done, _ = await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        i = tasks.pop(task)
                        task.result()  # _send records request errors itself; anything else is a bug: raise it
                        rec = records[i]
                        for j in queue.finished(i, rec.done or time.monotonic(), rec.ok):
                            lost = RequestRecord(sent=time.monotonic(), num_input=0, index=j,
                                                 error=f"not sent: request {requests[j].history_from} it "
                                                       "continues failed")
                            run.records.append(lost)
                            records[j] = lost
                            if on_done:
                                on_done()
                        if on_done:
                            on_done()
                run.complete = True
            finally:
                run.end = time.monotonic()
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, client, prompt: str, max_tokens: int, rec: RequestRecord,
                    want_ids: bool = False) -> None:
        httpx = _httpx()
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        if want_ids:
            body["return_token_ids"] = True  # vLLM streams each chunk's token ids; others ignore it
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
            ids = choice.get("token_ids")
            if isinstance(ids, list) and ids:  # vLLM's return_token_ids: this chunk's new token ids
                rec.token_ids = (rec.token_ids or []) + [int(t) for t in ids]
        usage = obj.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                rec.num_output = int(usage["completion_tokens"])
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                rec.num_cached = int(details["cached_tokens"])
            by_tier = details.get("cached_tokens_by_tier")  # tierlm serve: where the cached tokens came from
            if isinstance(by_tier, dict):
                rec.cached_by_tier = {str(k): int(v) for k, v in by_tier.items() if isinstance(v, (int, float))}
