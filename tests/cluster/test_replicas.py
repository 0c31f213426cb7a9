"""`tierlm serve --replicas 2` on a local Ray cluster: the official openai client works unchanged (plain and
streamed), greedy output equals one engine's, a repeated long prefix goes to the replica that holds it (and hits
its prefix cache there), replicas sharing a Redis tier hit each other's prefixes, and SIGTERM shuts it all
down."""
from __future__ import annotations

import signal
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install 'ray[serve]==2.60.0')")
openai = pytest.importorskip("openai")

from tierlm.bench.server_process import ServerProcess  # noqa: E402

PREFIX = "You are a careful assistant who answers in one short sentence. " * 6


FLAGS = ["--replicas", "2", "--replica-threads", "1", "--kv-cache-memory", "128MiB", "--max-num-seqs", "8"]


def cluster_process(*extra: str) -> ServerProcess:
    return ServerProcess([*FLAGS, *extra], startup_timeout_s=240, stop_timeout_s=120, module="tierlm.cluster")


@pytest.fixture(scope="module")
def cluster():
    with cluster_process() as srv:
        yield srv.url, srv.proc


@pytest.mark.slow
def test_replicas_serve_route_and_stop(cluster, default_llm):
    url, proc = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=12, temperature=0)
    from tierlm import SamplingParams

    one = default_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert r.choices[0].message.content == one  # the same greedy reply as one in-process engine

    chunks = client.chat.completions.create(model="default", messages=msgs, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == one

    seen = []
    for i in range(4):
        raw = client.completions.with_raw_response.create(model="default", prompt=PREFIX + f"Question {i}:",
                                                          max_tokens=2, temperature=0)
        seen.append((raw.headers["x-tierlm-replica"], raw.parse().usage))
    assert len({replica for replica, _ in seen}) == 1, seen  # the shared prefix stays on its replica
    details = seen[-1][1].prompt_tokens_details
    assert details is not None and details.cached_tokens >= 64  # ... and hits its prefix cache there

    health = httpx.get(f"{url}/health", timeout=30).json()  # the whole cluster's, from the ingress
    assert health["status"] == "ok" and health["replicas"]["running"] == 2, health
    tags = {r["tag"] for r in health["replicas"]["by_replica"]}
    assert len(tags) == 2 and seen[0][0] in tags
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    served = {}
    for line in metrics.splitlines():  # every replica's own request counter, labelled with its replica id
        if line.startswith("tierlm_requests_total{") and 'status="200"' in line:
            rid = line.split('replica="', 1)[1].split('"', 1)[0]
            served[rid] = served.get(rid, 0) + float(line.rsplit(" ", 1)[1])
    assert len(served) == 2 and sum(served.values()) >= 7, served  # the 7 requests above, across both
    assert 'tierlm_cluster_replicas{state="healthy"} 2.0' in metrics
    assert 'tierlm_cluster_replicas{state="running"} 2.0' in metrics
    assert 'tierlm_cluster_routed_total{by="prefix"}' in metrics

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


@pytest.mark.slow
def test_a_prefix_computed_on_one_replica_is_a_redis_hit_on_the_other(redis_server):
    with cluster_process("--routing", "round_robin", "--redis-url", redis_server.url,
                         "--tier-write", "write_through") as srv:
        url = srv.url
        body = {"prompt": PREFIX * 2 + "Question:", "max_tokens": 2, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert first.status_code == 200, first.text
        time.sleep(1.0)  # write-through to Redis runs on the tier's writer thread
        second = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert second.headers["x-tierlm-replica"] != first.headers["x-tierlm-replica"]  # round-robin: the other one
        details = second.json()["usage"]["prompt_tokens_details"]
        assert details["cached_tokens_by_tier"].get("redis", 0) >= 128, details
        assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


@pytest.mark.slow
def test_killing_a_replica_fails_no_request_that_has_not_started_streaming():
    import concurrent.futures
    import os

    with cluster_process("--routing", "least_loaded") as srv:
        url = srv.url
        pids = set()
        for i in range(6):  # find both replicas' pids
            r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Warm up {i}", "max_tokens": 1}, timeout=60)
            pids.add(int(r.headers["x-tierlm-replica"].rsplit(":", 1)[1]))
        assert len(pids) == 2, pids
        victim = min(pids)

        def one(i: int) -> tuple[int, str]:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Story number {i}:", "max_tokens": 24,
                                                          "ignore_eos": True, "temperature": 0}, timeout=180)
            return r.status_code, r.headers.get("x-tierlm-replica", "")

        def stream(i: int) -> tuple[str, list[str]]:
            body = {"prompt": f"Long tale {i}:", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
                return r.headers["x-tierlm-replica"], [x for x in r.iter_lines() if x.startswith("data:")]

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            streams = [pool.submit(stream, i) for i in range(2)]  # least loaded: one on each replica
            time.sleep(1.0)
            futures = [pool.submit(one, i) for i in range(50)]
            time.sleep(1.5)
            os.kill(victim, signal.SIGKILL)
            results = [f.result() for f in futures]
            streamed = [f.result() for f in streams]
        assert [s for s, _ in results] == [200] * 50, results  # none was lost: the ones on the victim were retried
        stats = httpx.get(f"{url}/cluster/stats", timeout=10).json()["ingress"]
        assert stats["retries"] >= 1
        for replica, events in streamed:  # a stream under way on the killed replica ends with an error event
            if replica.endswith(f":{victim}"):
                assert '"replica_failed"' in events[-1] and stats["failed_streams"] >= 1, events[-3:]
            else:
                assert events[-1] == "data: [DONE]"
        assert {r.rsplit(":", 1)[1] for r, _ in streamed} == {str(p) for p in pids}
        later = httpx.post(f"{url}/v1/completions", json={"prompt": "After", "max_tokens": 2}, timeout=120)
        assert later.status_code == 200
        deadline = time.monotonic() + 120
        while True:  # Serve starts a new replica; /health says what happened meanwhile
            health = httpx.get(f"{url}/health", timeout=30).json()
            pids_now = {int(r["tag"].rsplit(":", 1)[1]) for r in health["replicas"]["by_replica"]}
            if (health["status"] == "ok" and len(pids_now) == 2) or time.monotonic() > deadline:
                break
            assert health["status"] in ("ok", "degraded") and health["replicas"]["running"] >= 1, health
            time.sleep(2)
        assert health["status"] == "ok" and health["replicas"]["replica_deaths"] >= 1, health
        assert len(pids_now) == 2 and victim not in pids_now, health  # the dead one's report is gone
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert "tierlm_cluster_replica_deaths_total 1.0" in metrics, metrics[-800:]  # the one killed, once
        assert "tierlm_cluster_retries_total" in metrics
