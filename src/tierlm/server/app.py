"""build_app: the FastAPI app of `tierlm serve` around one AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, and
POST /admin/drift/rearm (clear a drift-guard trip, engine/drift_guard.py). /v1/* needs an API key when keys
are configured; /admin/* always needs one (403 when none is configured); /health and /metrics never do. The lifespan starts
the engine loop; on shutdown the server first stops accepting (uvicorn closes the listener, the gate
answers 503 to new API requests on open connections), lets in-flight requests finish, then stops the
engine loop.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

import tierlm
from tierlm.engine.async_engine import AsyncEngine
from tierlm.server.errors import APIError, install_error_handlers
from tierlm.server.gate import RequestGate, ServerState
from tierlm.server.metrics import ServerMetrics
from tierlm.server.prompt_policy import build_policies
from tierlm.server.protocol import ChatCompletionRequest, CompletionRequest
from tierlm.server.server_config import ServerConfig
from tierlm.server.serving import Admission
from tierlm.server.serving_chat import ChatServing
from tierlm.server.serving_completions import CompletionServing
from tierlm.server.summarizer import Summarizer


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


_ERRORS = {code: {"model": ErrorEnvelope, "description": desc} for code, desc in {
    400: "invalid parameter, or prompt over the context", 401: "missing or wrong API key",
    404: "unknown model", 408: "per-request timeout", 413: "request body too large",
    503: "waiting queue full (Retry-After) or shutting down"}.items()}


def build_app(aengine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    state = ServerState()
    summarizer = Summarizer(aengine)
    policies = build_policies(summarizer)
    metrics = ServerMetrics(aengine, lambda: completions.queue_length(), summarizer)
    admission = Admission()
    completions = CompletionServing(aengine, config, metrics, policies, admission)
    chat = ChatServing(aengine, config, metrics, policies, admission)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        aengine.start()
        try:
            yield
        finally:
            state.draining = True
            aengine.shutdown()

    app = FastAPI(title="tierlm", version=tierlm.__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of the tierlm inference engine.")
    app.state.tierlm = state
    app.state.aengine = aengine
    app.state.summarizer = summarizer
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestGate, config=config, metrics=metrics, state=state)

    @app.post("/v1/completions", responses=_ERRORS)
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create(request, body)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(request, body)

    @app.get("/v1/models", responses={401: _ERRORS[401]})
    async def list_models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": created, "owned_by": "tierlm",
            "root": aengine.engine.model_config.model_id, "max_model_len": completions.context_len}]}

    def tier_health() -> dict:
        """Configured KV tiers: healthy, use and capacity (absent without tiers). A down tier only turns its
        hits into recomputes, so it does not fail the health check."""
        return {name: {"healthy": bool(t.get("healthy", True)), "used_bytes": t.get("used_bytes", 0),
                       "capacity_bytes": t.get("capacity_bytes", 0)}
                for name, t in aengine.engine.tier_stats().items()}

    def drift_health() -> dict | None:
        """The drift guard's state (absent when it is off). A trip does not fail the health check: the server
        still serves, in the safe KV format."""
        eng = aengine.engine
        if eng.drift_guard is None:
            return None
        st = eng.drift_guard.status()
        return {"tripped": st["tripped"], "reason": st["reason"], "candidate_kv_format": eng.candidate_kv_format,
                "safe_kv_format": eng.safe_kv_format, "active_kv_format": eng.kv_format, "window": st["window"],
                "scored_requests": st["scored_requests"]}

    @app.post("/admin/drift/rearm", responses={401: _ERRORS[401], 403: {"model": ErrorEnvelope,
                                                                        "description": "no API key configured"}})
    async def rearm_drift_guard():
        if aengine.engine.drift_guard is None:
            raise APIError(400, "the drift guard is off: start the server with --drift-guard FRACTION",
                           code="drift_guard_off")
        was = await aengine.rearm_drift_guard()
        return {"rearmed": True, "was_tripped": was, "kv_format": aengine.engine.candidate_kv_format}

    @app.get("/health")
    async def health():
        tiers = tier_health()
        extra = {"tiers": tiers} if tiers else {}
        drift = drift_health()
        if drift is not None:
            extra["drift"] = drift
        if aengine.is_running and not state.draining:
            return {"status": "ok", **extra}
        return JSONResponse({"status": "unavailable", **extra}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
