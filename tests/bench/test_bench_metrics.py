"""Metric math on synthetic timelines: exact numbers, no engine."""
import pytest

from tierlm.bench.comparison import compare_runs
from tierlm.bench.metrics import SLO, Dist, RequestRecord, percentile, spread, summarize, union_length, usd_per_million


def rec(sent, times, done=None, n_in=10):
    return RequestRecord(sent=sent, num_input=n_in, token_times=list(times), done=done if done is not None else times[-1])


def test_percentile_interpolates_between_closest_ranks():
    xs = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def test_ttft_tpot_itl_e2e_of_one_request():
    r = rec(sent=1.0, times=[1.5, 1.6, 1.8, 2.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert rec(0.0, [0.4]).tpot is None  # one output token: no TPOT


def test_server_token_count_overrides_chunk_count_for_tpot():
    r = rec(sent=0.0, times=[1.0, 2.0])
    r.num_output = 5  # the server packed 5 tokens into 2 chunks
    assert r.tpot == pytest.approx(1.0 / 4)


def test_summarize_throughputs_and_distributions():
    a = rec(0.0, [1.0, 2.0, 3.0], n_in=100)      # ttft 1, tpot 1, e2e 3
    b = rec(1.0, [1.5, 2.0, 2.5, 3.0], n_in=50)   # ttft .5, tpot .5, e2e 2
    a.num_cached, b.num_cached = 40, 20
    m = summarize([a, b], wall_s=4.0)
    assert m.requests == 2 and m.output_tokens == 7 and m.input_tokens == 150
    assert m.requests_per_s == pytest.approx(0.5)
    assert m.output_tok_per_s == pytest.approx(7 / 4)
    assert m.total_tok_per_s == pytest.approx(157 / 4)
    assert m.ttft_ms.p50 == pytest.approx(750)
    assert m.e2e_ms.p99 == pytest.approx(2000 + 1000 * 0.99)
    assert m.tpot_ms.p50 == pytest.approx(750)
    assert m.itl_ms.p50 == pytest.approx(500)
    # prefill: union of [0,1] and [1,1.5] = 1.5 s for 150 tokens; decode: union [1,3] u [1.5,3] = 2 s, 5 tokens
    assert m.prefill_tok_per_s_wall == pytest.approx(100)
    assert m.decode_tok_per_s_wall == pytest.approx(2.5)
    assert m.hit_rate == pytest.approx(60 / 150)  # cached prompt tokens / prompt tokens
    assert m.goodput_req_per_s is None  # no SLO given


def test_failed_requests_are_counted_not_measured():
    bad = RequestRecord(sent=0.0, num_input=5, error="HTTP 500")
    m = summarize([rec(0.0, [1.0, 2.0]), bad], wall_s=2.0)
    assert m.requests == 1 and m.failed_requests == 1


def test_goodput_counts_requests_meeting_every_slo():
    fast = rec(0.0, [0.1, 0.2, 0.3])     # ttft 100 ms, tpot 100 ms
    slow_first = rec(0.0, [0.9, 1.0])    # ttft 900 ms
    slow_decode = rec(0.0, [0.1, 0.6])   # tpot 500 ms
    m = summarize([fast, slow_first, slow_decode], wall_s=2.0, slo=SLO(ttft_ms=500, tpot_ms=200))
    assert m.goodput_fraction == pytest.approx(1 / 3)
    assert m.goodput_req_per_s == pytest.approx(0.5)
    assert summarize([fast], 1.0, SLO(e2e_ms=250)).goodput_fraction == 0.0


def test_union_length_merges_overlaps():
    assert union_length([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert union_length([]) == 0.0
    assert union_length([(0, 1), (1, 2)]) == pytest.approx(2.0)


def test_usd_per_million_tokens():
    assert usd_per_million(3.6, 1000.0) == pytest.approx(1.0)  # $1/s of... 1000 tok/s at $3.6/h -> $1 per 1M
    assert usd_per_million(None, 1000.0) is None and usd_per_million(1.0, None) is None


def test_spread_across_reps():
    s = spread([10.0, 12.0, 11.0])
    assert (s.min, s.median, s.max, s.reps) == (10.0, 11.0, 12.0, 3)
    assert s.rel_spread == pytest.approx(2 / 11)
    assert spread([5.0]).rel_spread is None


def _run(config, ttft, tpot, e2e, kv, reps=((1.0, 1.0),)):
    """A run whose pooled p50s are the given figures; each rep scales (ttft, tpot) by its factors."""
    from tierlm.bench.metrics import RunMetrics
    from tierlm.bench.results import MemoryFigures, RepFigures, RunResult

    d = lambda v: Dist(v, v, v, v)  # noqa: E731
    m = RunMetrics(ttft_ms=d(ttft), tpot_ms=d(tpot), itl_ms=d(tpot), e2e_ms=d(e2e), requests=4, failed_requests=0,
                   input_tokens=40, output_tokens=40, cached_tokens=0, wall_s=1.0, requests_per_s=4.0,
                   output_tok_per_s=1000 / e2e, total_tok_per_s=None, prefill_tok_per_s_wall=1000 / ttft,
                   decode_tok_per_s_wall=1000 / tpot, hit_rate=None)
    per_rep = [RepFigures(ttft * a, tpot * b, e2e, 1000 / e2e, 1000 / (tpot * b)) for a, b in reps]
    return RunResult(config=config, driver="in-process", workload="w", workload_spec="w:x=1", shape="s",
                     concurrency=4, rate=None, burstiness=1.0, arrival="a", timed=False, reps=len(reps), incomplete=False,
                     metrics=m, per_rep=per_rep, spread={}, memory=MemoryFigures(kv_bytes_per_session=kv,
                                                                                 peak_kv_bytes=kv * 4),
                     cache_hit_rate={})


def test_comparison_against_baseline():
    runs = [_run("baseline", 200, 20, 1000, 400, reps=((1.0, 1.0), (1.0, 1.0))),
            _run("prefix-cache", 50, 20, 500, 300, reps=((0.8, 1.0), (1.2, 1.1)))]
    (c,) = compare_runs(runs)
    assert c.config == "prefix-cache" and c.reference == "baseline"
    assert c.kv_per_session_ratio == pytest.approx(0.75) and c.peak_kv_ratio == pytest.approx(0.75)
    assert (c.ttft_x.value, c.tpot_x.value, c.e2e_x.value) == pytest.approx((4.0, 1.0, 2.0))
    assert (c.ttft_x.lo, c.ttft_x.hi) == pytest.approx((200 / 60, 200 / 40))  # rep i against rep i
    assert (c.tpot_x.lo, c.tpot_x.hi) == pytest.approx((1 / 1.1, 1.0))
    assert c.decode_x.value == pytest.approx(1.0) and c.output_x.value == pytest.approx(2.0)


def test_http_peers_are_compared_with_tierlm_serve_not_the_engine():
    runs = [_run("baseline", 100, 10, 500, 1), _run("http:tierlm-serve", 110, 11, 550, 1),
            _run("http:http://peer", 220, 22, 1100, 1)]
    for r in runs[1:]:
        r.driver = "http"
    (c,) = compare_runs(runs)
    assert c.config == "http:http://peer" and c.reference == "http:tierlm-serve"
    assert c.e2e_x.value == pytest.approx(0.5)
