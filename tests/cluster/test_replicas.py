"""`tierlm serve --replicas 2` on a local Ray cluster: the official openai client works unchanged (plain and
streamed), greedy output equals one engine's, a repeated long prefix goes to the replica that holds it (and hits
its prefix cache there), replicas sharing a Redis tier hit each other's prefixes, and SIGTERM shuts it all
down."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install 'ray[serve]==2.60.0')")
openai = pytest.importorskip("openai")

PREFIX = "You are a careful assistant who answers in one short sentence. " * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tierlm.cli", "serve", "--replicas", "2", "--replica-threads", "1",
                             "--port", str(port), "--kv-cache-memory", "128MiB", "--max-num-seqs", "8", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tierlm serve --replicas exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError("the cluster did not come up in 240 s")



@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    proc = start(port)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc)
    yield url, proc
    if proc.poll() is None:
        proc.kill()

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

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


@pytest.mark.slow
def test_a_prefix_computed_on_one_replica_is_a_redis_hit_on_the_other(redis_server):
    port = free_port()
    proc = start(port, "--routing", "round_robin", "--redis-url", redis_server.url, "--tier-write", "write_through")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        body = {"prompt": PREFIX * 2 + "Question:", "max_tokens": 2, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert first.status_code == 200, first.text
        time.sleep(1.0)  # write-through to Redis runs on the tier's writer thread
        second = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert second.headers["x-tierlm-replica"] != first.headers["x-tierlm-replica"]  # round-robin: the other one
        details = second.json()["usage"]["prompt_tokens_details"]
        assert details["cached_tokens_by_tier"].get("redis", 0) >= 128, details
        assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


@pytest.mark.slow
def test_killing_a_replica_fails_no_request_that_has_not_started_streaming():
    import concurrent.futures
    import os

    port = free_port()
    proc = start(port, "--routing", "least_loaded")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
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
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
