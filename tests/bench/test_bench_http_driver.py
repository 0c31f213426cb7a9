"""The HTTP driver against a small local OpenAI-compatible stub server that streams fixed tokens."""
import pytest

pytest.importorskip("httpx")

from tierlm.bench.arrivals import ArrivalPlan  # noqa: E402
from tierlm.bench.http_driver import HttpDriver, ServerUnreachableError, check_server  # noqa: E402
from tierlm.bench.metrics import summarize  # noqa: E402
from tierlm.bench.workloads import BenchRequest  # noqa: E402


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_check_server_lists_models(stub):
    assert check_server(stub.url) == ["stub-model"]


def test_closed_loop_run_measures_streamed_tokens(stub):
    reqs = [BenchRequest(list(range(10)), 6) for _ in range(6)]
    run = HttpDriver(stub.url, Tok(), model="stub-model").run(reqs, ArrivalPlan(concurrency=2))
    assert run.complete and len(run.records) == 6
    assert stub.max_inflight <= 2
    for r in run.records:
        assert r.ok and r.n_out == 6 and len(r.token_times) == 6 and r.num_cached == 4
        assert r.text == " t0 t1 t2 t3 t4 t5"
        assert r.ttft >= 0.015 and r.tpot > 0 and r.e2e >= r.ttft
    body = stub.bodies[0]
    assert body["stream"] is True and body["temperature"] == 0.0 and body["max_tokens"] == 6
    assert body["model"] == "stub-model" and body["prompt"] == " ".join(map(str, range(10)))
    m = summarize(run.records, run.wall_s)
    assert m.requests == 6 and m.output_tokens == 36 and m.ttft_ms.p50 >= 15
    assert m.hit_rate == pytest.approx(4 * 6 / 60)  # the same definition as the engine: cached / prompt tokens


def test_open_loop_follows_arrival_offsets(stub):
    reqs = [BenchRequest([1, 2], 2, arrival_s=t) for t in (0.0, 0.2, 0.4)]
    run = HttpDriver(stub.url, Tok()).run(reqs, ArrivalPlan(concurrency=None, rate=1.0))
    sent = sorted(r.sent - run.start for r in run.records)
    assert sent == pytest.approx([0.0, 0.2, 0.4], abs=1e-6)
    assert run.wall_s >= 0.4


def test_server_errors_are_recorded_per_request(stub):
    run = HttpDriver(stub.url, Tok()).run([BenchRequest([1], 500), BenchRequest([1], 2)], ArrivalPlan(concurrency=2))
    errors = [r.error for r in run.records if r.error]
    assert len(errors) == 1 and "HTTP 400" in errors[0] and "maximum context length" in errors[0]
    assert summarize(run.records, run.wall_s).failed_requests == 1


def test_unreachable_url_is_one_clear_error():
    with pytest.raises(ServerUnreachableError) as e:
        check_server("http://127.0.0.1:9", timeout=1.0)
    assert "cannot reach the server" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ServerUnreachableError, match="not http"):
        check_server("localhost:8080")
