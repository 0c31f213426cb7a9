"""`tierlm serve --replicas N`: engine replicas on Ray Serve behind one OpenAI endpoint, routed by prompt prefix.

    client --HTTP--> Ray Serve proxy --> Ingress (one replica: parses just enough to route)
                         --DeploymentHandle, PrefixRequestRouter--> ReplicaServer x N (LLMEngine + tierlm's server app)

Each ReplicaServer runs tierlm's own server app (server/app.py) in-process, unchanged: the OpenAI protocol, auth,
limits, prompt policies and metrics are the single-process server's. The ingress relays each HTTP request to one
replica through a streaming DeploymentHandle call and streams the answer back; before that, it computes the
request's route key (chained hashes of the prompt's token blocks; the chat template applied for chat requests) and
session key (the request's `user`, or an `x-session-id` header). Ray Serve asks PrefixRequestRouter, a Serve
RequestRouter, which replica takes the request; it applies cluster/routing.py (longest known prefix, then session,
then least loaded; or round-robin). Replicas given the same `--redis-url` share that KV tier, so a prefix computed
on one is a remote-tier hit on the others.

A request whose replica dies before it sends its response head is retried on another replica (up to 2 times);
once streaming, the ingress ends the stream with an error event. Ray restarts dead replicas.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from fastapi import Request  # module level: the ingress's route annotations resolve here

from tierlm.cluster.routing import Router, route_key

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-tierlm-replica"
RETRIES = 3


@dataclass(frozen=True)
class Route:
    """What the router sees of a request: args[0] of every replica call."""

    key: tuple = ()
    session: str | None = None


# ---- the replica -----------------------------------------------------------------------------------
class ReplicaServer:
    """One engine and tierlm's server app around it (a Serve deployment class; see `build`)."""

    def __init__(self, engine_config, server_config, threads: int | None = None):
        import torch

        from tierlm.engine.async_engine import AsyncEngine
        from tierlm.engine.llm_engine import LLMEngine
        from tierlm.server.app import build_app

        if threads:
            torch.set_num_threads(threads)
        self.engine = LLMEngine(engine_config)
        self.aengine = AsyncEngine(self.engine).start()  # the app's lifespan never runs here: start the loop
        self.app = build_app(self.aengine, server_config)
        self.tag = f"{os.uname().nodename}:{os.getpid()}".encode()

    async def handle(self, route: Route, method: str, path: str, query: bytes, headers: list, body: bytes):
        from tierlm.cluster.asgi import call

        async for kind, value in call(self.app, method, path, query, headers, body):
            if kind == "start":
                status, hdrs = value
                value = (status, hdrs + [(REPLICA_HEADER, self.tag)])
            yield kind, value

    def stats(self) -> dict:
        e = self.engine
        return {"replica": self.tag.decode(), "counters": dict(e.counters), "tiers": e.tier_stats(),
                "prefix_cache_hits": e.kv.stats.prefix_cache_hits, "running": self.aengine.num_running,
                "waiting": self.aengine.num_waiting}

    def __del__(self):
        try:
            self.aengine.shutdown()
            self.engine.close()
        except Exception:  # noqa: BLE001 - best effort at actor exit
            pass


# ---- the router ------------------------------------------------------------------------------------
def _request_router_base():
    from ray.serve._private.request_router.request_router import LocalityMixin, MultiplexMixin, RequestRouter

    return LocalityMixin, MultiplexMixin, RequestRouter


try:  # the class must live at module level for Ray to import it by name in the ingress process
    _Locality, _Multiplex, _Base = _request_router_base()

    class PrefixRequestRouter(_Locality, _Multiplex, _Base):
        """Serve's hook into cluster/routing.py; loads are this router's own counts of requests in flight."""

        def initialize_state(self, mode: str = "cache", imbalance: int = 4, **kwargs):
            self.policy = Router(mode, imbalance)
            self.inflight: dict[str, int] = {}

        @staticmethod
        def _route(pending_request) -> Route:
            # duck-typed: Ray may hand the router a copy of Route from another import of this module
            args = getattr(pending_request, "args", None) or ()
            first = args[0] if args else None
            return Route(tuple(getattr(first, "key", ()) or ()), getattr(first, "session", None))

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            route = self._route(pending_request)
            pick = self.policy.choose(sorted(by_id), self.inflight, route.key, route.session)
            return [[by_id[pick]]]

        def on_request_routed(self, pending_request, replica_id, result):
            route = self._route(pending_request)
            rid = replica_id.unique_id
            self.policy.record(rid, route.key, route.session)
            self.inflight[rid] = self.inflight.get(rid, 0) + 1

        def on_request_completed(self, replica_id, internal_request_id):
            rid = replica_id.unique_id
            self.inflight[rid] = max(0, self.inflight.get(rid, 0) - 1)

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            self.policy.forget(replica_id.unique_id)
            self.inflight.pop(replica_id.unique_id, None)
except ImportError:  # no Ray: `tierlm serve --replicas` says how to install it
    PrefixRequestRouter = None


# ---- the ingress -----------------------------------------------------------------------------------
def route_of(tokenizer, path: str, body: bytes, headers: dict) -> Route:
    """The route key and session of a request (empty when the body is not a completion request)."""
    session = headers.get("x-session-id")
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        return Route((), session)
    if not isinstance(doc, dict):
        return Route((), session)
    session = session or (doc.get("user") if isinstance(doc.get("user"), str) else None)
    ids: list[int] = []
    try:
        if path.endswith("/chat/completions") and isinstance(doc.get("messages"), list):
            msgs = [{"role": m.get("role"), "content": m.get("content") if isinstance(m.get("content"), str)
                     else "".join(p.get("text", "") for p in m.get("content") or [] if isinstance(p, dict))}
                    for m in doc["messages"] if isinstance(m, dict)]
            ids = tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True),
                                   add_special_tokens=False)
        elif path.endswith("/completions"):
            p = doc.get("prompt")
            if isinstance(p, list) and p and isinstance(p[0], (str, list)):
                p = p[0]  # a batch routes by its first prompt
            ids = tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p or [] if isinstance(t, int)]
    except Exception:  # noqa: BLE001 - a body the server will reject routes anywhere; the replica says why
        ids = []
    return Route(route_key(ids), session)


def ingress_app(handle, model: str | None):
    """The ingress's ASGI app (built in the ingress replica): route, relay, stream back."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from tierlm.models.loader import load_checkpoint

    tokenizer = load_checkpoint(model).tokenizer
    app = FastAPI(title="tierlm cluster ingress")
    counts = {"retries": 0, "failed_streams": 0}

    @app.get("/cluster/stats")
    async def cluster_stats():
        return {"ingress": counts}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def relay(request: Request, path: str):
        body = await request.body()
        hdrs = {k.lower(): v for k, v in request.headers.items()}
        route = route_of(tokenizer, "/" + path, body, hdrs)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        last_error = None
        for attempt in range(RETRIES + 1):
            gen = handle.options(stream=True).handle.remote(route, request.method, "/" + path,
                                                           request.url.query.encode(), raw, body)
            try:
                kind, head = await gen.__anext__()
            except StopAsyncIteration:
                return JSONResponse({"error": {"message": "the replica sent no response", "type": "server_error",
                                               "code": "replica_failed"}}, status_code=502)
            except Exception as e:  # noqa: BLE001 - the replica died before answering: try another
                last_error = e
                counts["retries"] += 1
                log.warning("replica failed before answering (%s); retrying (%d/%d)", type(e).__name__,
                            attempt + 1, RETRIES)
                continue
            status, headers = head
            break
        else:
            return JSONResponse({"error": {"message": f"no replica could serve the request ({type(last_error).__name__})",
                                           "type": "server_error", "code": "replica_failed"}}, status_code=503)

        async def rest():
            try:
                async for kind, value in gen:
                    if kind == "body":
                        yield value
            except Exception as e:  # noqa: BLE001 - mid-stream: end it with an error event
                counts["failed_streams"] += 1
                err = {"error": {"message": f"the replica serving this stream failed ({type(e).__name__})",
                                 "type": "server_error", "code": "replica_failed"}}
                yield f"data: {json.dumps(err)}\n\n".encode()

        out = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() != b"content-length"}
        return StreamingResponse(rest(), status_code=status, headers=out, media_type=out.get("content-type"))

    return app


# ---- deploying -------------------------------------------------------------------------------------
REPLICAS_APP = "tierlm-replicas"
INGRESS_APP = "tierlm"


def deploy(engine_config, server_config, replicas: int, threads: int | None = None, mode: str = "cache",
           imbalance: int = 4) -> None:
    """Run the replicas (an application without a route) and the ingress (routed at /) on the connected cluster."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    replica = serve.deployment(
        ReplicaServer, name="tierlm-replica", num_replicas=replicas,
        ray_actor_options={"num_cpus": threads or 1},
        max_ongoing_requests=max(8, 2 * engine_config.scheduler.max_num_seqs),
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixRequestRouter,
            request_router_kwargs={"mode": mode, "imbalance": imbalance}),
    ).bind(engine_config, server_config, threads)
    serve.run(replica, name=REPLICAS_APP, route_prefix=None)
    model = engine_config.model

    def builder():
        from ray import serve as _serve

        return ingress_app(_serve.get_deployment_handle("tierlm-replica", app_name=REPLICAS_APP), model)

    # Serve's default of 5 ongoing requests per replica would queue the ingress itself: it only relays, so it takes
    # every request the replicas together can hold (and the server's queue beyond that)
    capacity = replicas * max(8, 2 * engine_config.scheduler.max_num_seqs) + server_config.max_queue
    ingress = serve.deployment(serve.ingress(builder)(), name="tierlm-ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=capacity)
    serve.run(ingress.bind(), name=INGRESS_APP, route_prefix="/")
