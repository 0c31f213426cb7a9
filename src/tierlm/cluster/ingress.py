"""The cluster's ingress (one Serve replica, routed at /): computes each request's route key and session, relays
it to a replica through one streaming DeploymentHandle (retrying one whose replica died before answering) and
streams the answer back; answers GET /health, /metrics and /cluster/stats for the whole cluster from the board
and Serve's status. See cluster/deploy.py for the layout."""
from __future__ import annotations

import asyncio
import json
import logging

from fastapi import Request  # module level: the ingress's route annotations resolve here

from tierlm.cluster.deploy import (BOARD, BOARD_NAMESPACE, REPLICA_DEPLOYMENT, REPLICAS_APP, RETRIES, STALE_S, Route,
                                   live_router)
from tierlm.cluster.routing import route_key

log = logging.getLogger(__name__)


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


STATUS_TIMEOUT_S = 5.0  # the board's snapshot, Serve's status


def merged_metrics(answers: list[dict], ingress: list) -> bytes:
    """The replicas' Prometheus expositions as one, each sample labelled replica="<id>", then the ingress's own
    metric families (`ingress`)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, object] = {}
    for a in answers:
        for fam in text_string_to_metric_families(a.get("metrics", "")):
            samples = [x._replace(labels={**x.labels, "replica": a["id"]}) for x in fam.samples]
            if fam.name in families:
                families[fam.name].samples.extend(samples)
            else:
                fam.samples = samples
                families[fam.name] = fam

    class _Collector:
        def collect(self):
            return [*families.values(), *ingress]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)


def ingress_app(handle, model: str | None, replicas: int = 1):
    """The ingress's ASGI app (built in the ingress replica): route, relay, stream back; and the cluster's
    /health, /metrics and /cluster/stats. `replicas`: how many the deployment asks for."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from tierlm.models.loader import load_checkpoint

    tokenizer = load_checkpoint(model).tokenizer
    app = FastAPI(title="tierlm cluster ingress")
    counts = {"retries": 0, "failed_streams": 0}
    relay_handle = handle.options(stream=True, method_name="handle")

    async def probe_all() -> list[dict]:
        """The running replicas' latest reports (at most STALE_S old), from the board."""
        import ray

        try:
            board = ray.get_actor(BOARD, namespace=BOARD_NAMESPACE)
            reports = await asyncio.wait_for(board.snapshot.remote(STALE_S), STATUS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - no board: no reports (health then rests on Serve's view)
            log.warning("the cluster board did not answer: %s", e)
            return []
        router = live_router()
        running = set(router.replica_ids()) if router is not None else None
        return sorted((r for r in reports if running is None or r["id"] in running), key=lambda r: r["id"])

    def deaths() -> int:
        router = live_router()
        return len(router.dead) if router is not None else 0

    async def replica_states() -> dict[str, int]:
        """Serve's own view of the replicas (its controller health-checks them, outside the request queues):
        {"RUNNING": 2} or {"RUNNING": 1, "STARTING": 1}; {} when the controller does not answer."""
        from ray import serve

        try:
            st = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
            dep = st.applications[REPLICAS_APP].deployments[REPLICA_DEPLOYMENT]
            return {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
        except Exception:  # noqa: BLE001 - reported as no running replica known
            return {}

    async def cluster_view() -> tuple[str, dict, list[dict]]:
        """(status, Serve's replica states, probe answers). ok: all expected replicas running and none that
        answered is unhealthy; unavailable: none running; else degraded."""
        states, answers = await asyncio.gather(replica_states(), probe_all())
        running = states.get("RUNNING", 0)
        unhealthy = any("health_status" in a and a["health_status"] != 200 for a in answers)
        status = ("unavailable" if not running else "ok" if running >= replicas and not unhealthy
                  else "degraded")
        return status, states, answers

    @app.get("/health")
    async def health():
        status, states, answers = await cluster_view()
        by = [{"id": a["id"], "tag": a["tag"], "running": a["running"], "waiting": a["waiting"],
               "reported_s_ago": a["age_s"], **a["health"]} for a in answers]
        body = {"status": status, "replicas": {"expected": replicas, "running": states.get("RUNNING", 0),
                                               "states": states, "replica_deaths": deaths(), "by_replica": by},
                "ingress": counts}
        return JSONResponse(body, status_code=503 if status == "unavailable" else 200)

    @app.get("/metrics")
    async def metrics():
        _, states, answers = await cluster_view()
        up = GaugeMetricFamily("tierlm_cluster_replicas", "engine replicas: expected, running (Serve's view), "
                               "reporting (to the board, within 10 s), healthy", labels=["state"])
        up.add_metric(["expected"], replicas)
        up.add_metric(["running"], states.get("RUNNING", 0))
        up.add_metric(["reporting"], len(answers))
        up.add_metric(["healthy"], sum(a.get("health_status") == 200 for a in answers))
        own = [up]
        for name, doc, value in (
                ("tierlm_cluster_replica_deaths", "replicas seen to die (Serve starts a new one)", deaths()),
                ("tierlm_cluster_retries", "requests retried on another replica after theirs failed before "
                                           "answering", counts["retries"]),
                ("tierlm_cluster_failed_streams", "streams ended by an error event when their replica failed",
                 counts["failed_streams"])):
            own.append(CounterMetricFamily(name, doc, value=value))
        router = live_router()
        routed = CounterMetricFamily("tierlm_cluster_routed", "routing decisions by reason (overloaded and "
                                     "short_match: affinity declined)", labels=["by"])
        for by, n in (router.policy.counters.items() if router is not None else ()):
            routed.add_metric([by], n)
        own.append(routed)
        return Response(merged_metrics(answers, own), media_type=CONTENT_TYPE_LATEST)

    @app.get("/cluster/stats")
    async def cluster_stats():
        status, states, answers = await cluster_view()
        router = live_router()
        return {"status": status, "replica_states": states, "ingress": counts, "replica_deaths": deaths(),
                "routing": dict(router.policy.counters) if router is not None else {},
                "replicas": [{k: v for k, v in a.items() if k not in ("metrics", "health")} for a in answers]}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def relay(request: Request, path: str):
        body = await request.body()
        hdrs = {k.lower(): v for k, v in request.headers.items()}
        route = route_of(tokenizer, "/" + path, body, hdrs)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        last_error = None
        for attempt in range(RETRIES + 1):
            gen = relay_handle.remote(route, request.method, "/" + path,
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


