"""Serving: the pipeline both OpenAI endpoints share.

    check fields (400 for one accepted but not implemented) -> check model -> admit (bounded queue, 503)
    -> SamplingParams (400 naming the param) -> fit the prompt (prompt policy) -> add to the AsyncEngine
    -> stream SSE or collect one response, under the per-request deadline (408) and, for plain
    responses, abort on client disconnect.

Subclasses (serving_completions.py, serving_chat.py) turn requests into token ids and RequestOutputs
into the OpenAI shapes: `first_chunk`, `chunks` (deltas since the last output) and `response`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tierlm.core.errors import InvalidParameterError
from tierlm.core.outputs import RequestOutput
from tierlm.core.sampling_params import STRUCTURED_PARAMS, SamplingParams, StructuredOutputsParams
from tierlm.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tierlm.server.errors import APIError
from tierlm.server.metrics import ServerMetrics
from tierlm.server.prompt_policy import FittedPrompt, PolicyInput, PromptPolicy
from tierlm.server.protocol import structured_outputs, unknown_fields, unsupported_field
from tierlm.server.server_config import ServerConfig

log = logging.getLogger(__name__)

DEFAULT_RESERVE = 256  # generation room kept when a policy cuts a prompt that set no max_tokens
_logged_unknown: set[str] = set()  # undeclared request fields already logged (each once; at most 256 names)


@dataclass
class Job:
    """One request on its way through the pipeline."""

    id: str
    params: SamplingParams
    fitted: FittedPrompt
    include_usage: bool
    start: float
    created: int = field(default_factory=lambda: int(time.time()))
    first_token: float | None = None


@dataclass
class Admission:
    """Sequences admitted but not yet in the engine (prompt fitting may await), shared by all endpoints,
    so that concurrent requests cannot all slip past the queue limit while they are being prepared."""

    reserved: int = 0


class Serving:
    kind = "base"
    id_prefix = "cmpl"

    def __init__(self, aengine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics,
                 policies: dict[str, PromptPolicy], admission: Admission | None = None):
        self.admission = admission or Admission()
        self.aengine = aengine
        self.engine = aengine.engine
        self.tokenizer = self.engine.tokenizer
        self.config = config
        self.metrics = metrics
        self.policies = policies
        self.model_names = {config.model_name, self.engine.model_config.model_id}
        self.token_text = lru_cache(maxsize=65536)(self._token_text)
        self.tier_names = tuple(self.engine.tier_stats())  # the configured lower tiers, in lookup order

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @property
    def context_len(self) -> int:
        """Most tokens one sequence can hold: the model's context, or less when the KV pool (and, with sparse
        spilling, the spill store) holds less; the engine caps max_model_len there."""
        return self.engine.max_model_len

    # ---- checks --------------------------------------------------------------------------------
    @staticmethod
    def check_fields(body) -> None:
        """400 naming the first field set to a value this server accepts but does not implement (the
        table is protocol.UNSUPPORTED); undeclared fields are ignored, each logged once at debug level."""
        found = unsupported_field(body)
        if found is not None:
            param, message = found
            raise APIError(400, message, param=param, code="unsupported_parameter")
        new = [f for f in unknown_fields(body) if f not in _logged_unknown]
        if new and len(_logged_unknown) < 256:  # names come from clients: keep the memo bounded
            _logged_unknown.update(new)
            log.debug("ignoring unknown request fields (logged once each): %s", ", ".join(new))

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.config.model_name}'",
                           param="model", code="model_not_found")

    def queue_length(self, extra: int = 0) -> int:
        a = self.aengine
        return max(0, a.num_waiting, a.num_seqs_in_flight + extra - self.engine.scheduler.config.max_num_seqs)

    def admit(self, n: int) -> None:
        capacity = self.engine.scheduler.config.max_num_seqs + self.config.max_queue
        if n > capacity:
            raise APIError(400, f"n={n} is more than this server can ever run at once ({capacity})", param="n")
        if not self.aengine.is_running:
            raise APIError(503, "the engine is not running", code="engine_dead")
        if self.queue_length(n + self.admission.reserved) > self.config.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, f"the server is busy: the waiting queue is full ({self.config.max_queue}); "
                                "retry later", code="queue_full", headers={"Retry-After": str(self.config.retry_after)})

    @staticmethod
    def sampling_params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        opt = lambda v, d: d if v is None else v  # noqa: E731
        constraint, source = structured_outputs(body)
        try:
            structured = StructuredOutputsParams.from_dict(constraint)
        except InvalidParameterError as e:
            e.param = source
            raise
        return SamplingParams(
            n=body.n, max_tokens=max_tokens, min_tokens=body.min_tokens, temperature=opt(body.temperature, 1.0),
            top_p=opt(body.top_p, 1.0), top_k=opt(body.top_k, 0), min_p=opt(body.min_p, 0.0),
            repetition_penalty=opt(body.repetition_penalty, 1.0), presence_penalty=opt(body.presence_penalty, 0.0),
            frequency_penalty=opt(body.frequency_penalty, 0.0), seed=body.seed, stop=body.stop or [],
            stop_token_ids=body.stop_token_ids or [], include_stop_str_in_output=body.include_stop_str_in_output,
            ignore_eos=body.ignore_eos, logprobs=logprobs, skip_special_tokens=body.skip_special_tokens,
            structured_outputs=structured)

    # ---- prompt fitting ------------------------------------------------------------------------
    async def fit(self, ids: list[int], body, max_tokens: int | None, messages=None, render=None) -> FittedPrompt:
        mml = self.context_len
        budget = body.tierlm_max_prompt_tokens
        n = len(ids)
        over_context = n + (max_tokens or 1) > mml
        if not over_context and (budget is None or n <= budget):
            return FittedPrompt(ids, "none", n)
        param = "messages" if messages is not None else "prompt"
        if over_context:
            asked = f"{n + max_tokens} tokens ({n} in the {param}, {max_tokens} in the completion)" if max_tokens \
                else f"{n} tokens in the {param}"
            overflow = APIError(400, f"This model's maximum context length is {mml} tokens. However, you requested "
                                     f"{asked}. Please reduce the length of the {param} or completion.",
                                param=param, code="context_length_exceeded")
        else:
            overflow = APIError(400, f"the prompt has {n} tokens, over tierlm_max_prompt_tokens={budget}",
                                param="tierlm_max_prompt_tokens", code="prompt_budget_exceeded")
        limit = mml - (max_tokens or min(DEFAULT_RESERVE, mml // 4))
        if budget is not None:
            limit = min(limit, budget)
        name = body.tierlm_prompt_policy or self.config.prompt_policy
        if limit < 1 and name != "reject":
            raise APIError(400, f"max_tokens={max_tokens} leaves no room for a prompt in the {mml}-token context",
                           param="max_tokens", code="context_length_exceeded")
        fitted = await self.policies[name].fit(PolicyInput(ids, limit, overflow, messages, render))
        self.metrics.prompt_policy.labels(fitted.policy).inc()
        return fitted

    # ---- running -------------------------------------------------------------------------------
    async def serve(self, request: Request, body, prepare) -> JSONResponse | StreamingResponse:
        """Admit, then await `prepare()` -> (fitted, params), then stream or answer in one piece."""
        self.admit(body.n)
        self.admission.reserved += body.n  # the event loop is single-threaded: no lock needed
        start = time.monotonic()
        deadline = None if self.config.timeout is None else start + self.config.timeout
        try:
            async with asyncio.timeout_at(deadline):
                fitted, params = await prepare()
                stream = await self.aengine.add_request(fitted.token_ids, params,
                                                        f"{self.id_prefix}-{uuid.uuid4().hex}")
        except (TimeoutError, EngineDeadError, InvalidParameterError) as e:
            if isinstance(e, InvalidParameterError) and e.param in STRUCTURED_PARAMS:
                e.param = structured_outputs(body)[1]  # the request field the rejected constraint came from
            raise self._api_error(e) from None
        finally:
            self.admission.reserved -= body.n
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        job = Job(stream.request_id, params, fitted, include_usage, start)
        headers = {"x-tierlm-prompt-policy": fitted.policy, "x-request-id": job.id}
        if body.stream:
            events = self._sse(job, stream, deadline)
            # A client gone before the first event leaves the generator unstarted, so its `finally`
            # never runs: abort when the generator is collected instead (no-op once finished).
            weakref.finalize(events, stream.abort)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers=dict(headers, **{"Cache-Control": "no-cache"}))
        final = await self._until_disconnect(request, self._collect(job, stream, deadline))
        if final is None:  # client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        return JSONResponse(self.response(job, final), headers=headers)

    def _api_error(self, e: BaseException) -> APIError:
        """The APIError for a timeout (408), a dead engine (503) or a rejected parameter (400)."""
        if isinstance(e, TimeoutError):
            return APIError(408, f"the request did not finish within the server's {self.config.timeout:g} s "
                                 "timeout", code="timeout")
        if isinstance(e, EngineDeadError):
            return APIError(503, str(e), code="engine_dead")
        return APIError.from_invalid(e)

    @staticmethod
    def _note_output(job: Job, out: RequestOutput) -> None:
        if job.first_token is None and any(c.token_ids for c in out.outputs):
            job.first_token = time.monotonic()

    async def _collect(self, job: Job, stream: RequestStream, deadline: float | None) -> RequestOutput:
        final = None
        try:
            async with asyncio.timeout_at(deadline):
                async for out in stream:
                    self._note_output(job, out)
                    final = out
        except (TimeoutError, EngineDeadError) as e:
            raise self._api_error(e) from None
        finally:
            stream.abort()
        self._observe(job, final)
        return final

    @staticmethod
    async def _until_disconnect(request: Request, coro):
        """Run `coro`; if the client disconnects first, cancel it (its stream aborts) and return None."""
        task = asyncio.ensure_future(coro)

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            return None
        return task.result()

    async def _sse(self, job: Job, stream: RequestStream, deadline: float | None) -> AsyncIterator[str]:
        final = None
        state = self.new_stream_state(job)
        try:
            first = self.first_chunk(job)
            if first:
                yield first
            async with asyncio.timeout_at(deadline):
                async for out in stream:
                    self._note_output(job, out)
                    final = out
                    text = self.chunks(job, state, out)
                    if text:
                        yield text
            if job.include_usage:
                yield _event(self._chunk_base(job, [], usage=self.usage(job, final)))
            self._observe(job, final)
        except (TimeoutError, EngineDeadError) as e:
            yield self._api_error(e).sse()
        except Exception as e:  # noqa: BLE001 - e.g. an engine step failed: end the stream with an error event
            log.exception("stream %s failed", job.id)
            yield APIError(500, f"internal error: {type(e).__name__}").sse()
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"

    def _observe(self, job: Job, final: RequestOutput | None) -> None:
        if final is None:
            return
        ttft = None if job.first_token is None else job.first_token - job.start
        n_out = max((len(c.token_ids) for c in final.outputs), default=0)  # per sequence, for TPOT
        self.metrics.observe_request(ttft, time.monotonic() - job.start, len(final.prompt_token_ids),
                                     sum(len(c.token_ids) for c in final.outputs), n_out)

    # ---- shapes shared by both endpoints -------------------------------------------------------
    def usage(self, job: Job, final: RequestOutput | None) -> dict:
        prompt = len(job.fitted.token_ids)
        completion = sum(len(c.token_ids) for c in final.outputs) if final else 0
        cached = final.num_cached_tokens if final else 0
        # Extension: where the cached tokens came from, the device pool and every configured tier (0 if none).
        by_tier = {"device": 0, **{name: 0 for name in self.tier_names}}
        for name, n in (final.cached_tokens_by_tier if final else {}).items():
            by_tier[name] = by_tier.get(name, 0) + n
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached, "cached_tokens_by_tier": by_tier}}

    def _chunk_base(self, job: Job, choices: list, usage: dict | None = None, extra: bool = False) -> dict:
        d = {"id": job.id, "object": self.chunk_object, "created": job.created,
             "model": self.config.model_name, "choices": choices}
        if job.include_usage:
            d["usage"] = usage
        if extra:
            d["tierlm"] = job.fitted.info()
        return d

    # subclass hooks
    chunk_object = "text_completion"

    def new_stream_state(self, job: Job) -> dict:
        n = job.params.n
        return {"text": [0] * n, "tokens": [0] * n, "done": [False] * n, "sent_info": False}

    def first_chunk(self, job: Job) -> str | None:
        return None

    def chunks(self, job: Job, state: dict, out: RequestOutput) -> str:
        """SSE events for what changed since the last output: one chunk per choice that moved."""
        events = []
        want_lp = job.params.logprobs is not None
        for c in out.outputs:
            i = c.index
            if state["done"][i]:
                continue
            delta = c.text[state["text"][i]:]
            ntok = len(c.token_ids)
            lp = self.logprobs(c, state["tokens"][i], ntok, state["text"][i]) \
                if want_lp and ntok > state["tokens"][i] else None
            if not delta and c.finish_reason is None and lp is None:
                continue
            state["text"][i], state["tokens"][i] = len(c.text), ntok
            state["done"][i] = c.finish_reason is not None
            choice = self.stream_choice(i, delta, lp, c)
            events.append(_event(self._chunk_base(job, [choice], extra=not state["sent_info"])))
            state["sent_info"] = True
        return "".join(events)

    def stream_choice(self, index: int, delta: str, logprobs, c) -> dict:
        raise NotImplementedError

    def logprobs(self, c, start: int, end: int, text_offset: int):
        raise NotImplementedError

    def response(self, job: Job, final: RequestOutput) -> dict:
        raise NotImplementedError


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
