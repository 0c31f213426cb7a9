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

A request whose replica dies before it sends its response head is retried on another replica (up to 3 times);
once streaming, the ingress ends the stream with an error event. Ray Serve starts a new replica for a dead one.
The ingress answers GET /health, /metrics and /cluster/stats itself, for the whole cluster. Every replica reports
its server's own /health and /metrics and its engine state every 2 s to a small Ray actor (the board; off Serve's
request queues, so a busy replica still reports); the ingress joins the running replicas' reports with Serve's
own view of them (running, starting) and what the ingress saw (retries, failed streams, replica deaths, routing
decisions). /metrics labels each replica's samples replica="<Serve replica id>".
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

from tierlm.cluster.routing import Router

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-tierlm-replica"
RETRIES = 3


@dataclass(frozen=True)
class Route:
    """What the router sees of a request: args[0] of every replica call."""

    key: tuple = ()
    session: str | None = None


PUBLISH_S = 2.0  # how often each replica reports to the board
STALE_S = 10.0  # a report older than this is a replica that stopped reporting (dead, or hung)
BOARD = "tierlm-cluster-board"
BOARD_NAMESPACE = "tierlm"


class Board:
    """A Ray actor: the replicas' latest reports (probe dicts), keyed by replica id."""

    def __init__(self):
        self.reports: dict[str, tuple[float, dict]] = {}

    def put(self, replica_id: str, report: dict) -> None:
        self.reports[replica_id] = (time.time(), report)

    def snapshot(self, max_age_s: float = STALE_S) -> list[dict]:
        now = time.time()
        for rid in [r for r, (t, _) in self.reports.items() if now - t > 10 * max_age_s]:
            del self.reports[rid]  # long gone
        return [dict(report, age_s=round(now - t, 2)) for t, report in self.reports.values() if now - t <= max_age_s]


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
        self._stop = threading.Event()
        try:
            from ray import serve

            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve: nobody to report to
            self.replica_id = self.tag.decode()
        else:
            threading.Thread(target=self._publish, name="tierlm-board", daemon=True).start()

    def _publish(self) -> None:
        """Every PUBLISH_S, this replica's probe to the board, which the ingress reads for the cluster's /health,
        /metrics and /cluster/stats (the board is off Serve's request path, so a busy replica still reports)."""
        import ray

        board = None
        while not self._stop.wait(0 if board is None else PUBLISH_S):
            try:
                board = board or ray.get_actor(BOARD, namespace=BOARD_NAMESPACE)
                ray.get(board.put.remote(self.replica_id, asyncio.run(self.probe())), timeout=PUBLISH_S)
            except Exception as e:  # noqa: BLE001 - no board (outside deploy()) or a slow one: try again later
                log.debug("publishing to the board failed: %s", e)
                if board is None:
                    self._stop.wait(PUBLISH_S)

    async def handle(self, route: Route, method: str, path: str, query: bytes, headers: list, body: bytes):
        """One HTTP request through the server app, streamed back as ("start", (status, headers)) then ("body",
        bytes) items."""
        from tierlm.cluster.asgi import call

        async for kind, value in call(self.app, method, path, query, headers, body):
            if kind == "start":
                status, hdrs = value
                value = (status, hdrs + [(REPLICA_HEADER, self.tag)])
            yield kind, value

    async def probe(self) -> dict:
        """This replica's server /health and /metrics (its own, as a single server answers them) and engine state,
        for the ingress's cluster-wide views."""
        from tierlm.cluster.asgi import fetch

        status, health = await fetch(self.app, "GET", "/health")
        _, metrics = await fetch(self.app, "GET", "/metrics")
        e = self.engine
        return {"id": self.replica_id, "tag": self.tag.decode(), "health_status": status,
                "health": json.loads(health), "metrics": metrics.decode(), "running": self.aengine.num_running,
                "waiting": self.aengine.num_waiting, "counters": dict(e.counters), "tiers": e.tier_stats(),
                "prefix_cache_hits": e.kv.stats.prefix_cache_hits}

    def __del__(self):
        self._stop.set()
        try:
            self.aengine.shutdown()
            self.engine.close()
        except Exception:  # noqa: BLE001 - best effort at actor exit
            pass


# ---- the router ------------------------------------------------------------------------------------
def _request_router_base():
    from ray.serve._private.request_router.request_router import LocalityMixin, MultiplexMixin, RequestRouter

    return LocalityMixin, MultiplexMixin, RequestRouter


_ROUTERS: list = []  # this process's PrefixRequestRouter (the ingress's replica handle makes one on first use)


def live_router():
    import tierlm.cluster.deploy as this  # the imported module, whichever copy of this code runs

    return this._ROUTERS[-1] if this._ROUTERS else None


try:  # the class must live at module level for Ray to import it by name in the ingress process
    _Locality, _Multiplex, _Base = _request_router_base()

    class PrefixRequestRouter(_Locality, _Multiplex, _Base):
        """Serve's hook into cluster/routing.py; loads are this router's own counts of requests in flight."""

        def initialize_state(self, mode: str = "cache", imbalance: int = 4, min_match: float = 0.5, **kwargs):
            self.policy = Router(mode, imbalance, min_match)
            self.inflight: dict[str, int] = {}
            self.dead: set[str] = set()  # Ray may report one death more than once
            import tierlm.cluster.deploy as this  # not this copy's globals: Ray may have pickled it by value

            this._ROUTERS.append(self)

        @staticmethod
        def _route(pending_request) -> Route:
            # duck-typed: Ray may hand the router a copy of Route from another import of this module
            args = getattr(pending_request, "args", None) or ()
            first = args[0] if args else None
            return Route(tuple(getattr(first, "key", ()) or ()), getattr(first, "session", None))

        def replica_ids(self) -> list[str]:
            return sorted(r.unique_id for r in list(self.curr_replicas))

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
            self.dead.add(replica_id.unique_id)
            self.policy.forget(replica_id.unique_id)
            self.inflight.pop(replica_id.unique_id, None)
except ImportError:  # no Ray: `tierlm serve --replicas` says how to install it
    PrefixRequestRouter = None


# ---- deploying -------------------------------------------------------------------------------------
REPLICAS_APP = "tierlm-replicas"
REPLICA_DEPLOYMENT = "tierlm-replica"
INGRESS_APP = "tierlm"


def replica_actor_options(threads: int | None = None, gpus: float = 0.0) -> dict:
    """Ray resources per replica: its CPU threads, and GPUs when it runs on CUDA (Ray sets CUDA_VISIBLE_DEVICES,
    so the engine's device "auto" finds its own)."""
    options: dict = {"num_cpus": threads or 1}
    if gpus:
        options["num_gpus"] = gpus
    return options


def deploy(engine_config, server_config, replicas: int, threads: int | None = None, mode: str = "cache",
           imbalance: int = 4, min_match: float = 0.5, gpus: float = 0.0) -> None:
    """Run the replicas (an application without a route) and the ingress (routed at /) on the connected cluster."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    ray.remote(Board).options(name=BOARD, namespace=BOARD_NAMESPACE, get_if_exists=True, num_cpus=0,
                              lifetime="detached").remote()
    replica = serve.deployment(
        ReplicaServer, name=REPLICA_DEPLOYMENT, num_replicas=replicas,
        ray_actor_options=replica_actor_options(threads, gpus),
        max_ongoing_requests=max(8, 2 * engine_config.scheduler.max_num_seqs),
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixRequestRouter,
            request_router_kwargs={"mode": mode, "imbalance": imbalance, "min_match": min_match}),
    ).bind(engine_config, server_config, threads)
    serve.run(replica, name=REPLICAS_APP, route_prefix=None)
    model = engine_config.model

    def builder():
        from ray import serve as _serve

        from tierlm.cluster.ingress import ingress_app

        return ingress_app(_serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=REPLICAS_APP), model, replicas)

    # Serve's default of 5 ongoing requests per replica would queue the ingress itself: it only relays, so it takes
    # every request the replicas together can hold (and the server's queue beyond that)
    capacity = replicas * max(8, 2 * engine_config.scheduler.max_num_seqs) + server_config.max_queue
    ingress = serve.deployment(serve.ingress(builder)(), name="tierlm-ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=capacity)
    serve.run(ingress.bind(), name=INGRESS_APP, route_prefix="/")
