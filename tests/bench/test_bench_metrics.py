"""Metric math on synthetic timelines: exact numbers, no engine."""
import pytest

from tierlm.bench.comparison import compare_runs
from tierlm.bench.metrics import SLO, RequestRecord, hit_rate_delta, percentile, spread, summarize, union_length, \
    usd_per_million


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
    m = summarize([a, b], wall_s=4.0)
    assert m["requests"] == 2 and m["output_tokens"] == 7 and m["input_tokens"] == 150
    assert m["requests_per_s"] == pytest.approx(0.5)
    assert m["output_tok_per_s"] == pytest.approx(7 / 4)
    assert m["total_tok_per_s"] == pytest.approx(157 / 4)
    assert m["ttft_ms"]["p50"] == pytest.approx(750)
    assert m["e2e_ms"]["p99"] == pytest.approx(2000 + 1000 * 0.99)
    assert m["tpot_ms"]["p50"] == pytest.approx(750)
    assert m["itl_ms"]["p50"] == pytest.approx(500)
    # prefill: union of [0,1] and [1,1.5] = 1.5 s for 150 tokens; decode: union [1,3] u [1.5,3] = 2 s, 5 tokens
    assert m["prefill_tok_per_s"] == pytest.approx(100)
    assert m["decode_tok_per_s"] == pytest.approx(2.5)
    assert m["goodput_req_per_s"] is None  # no SLO given


def test_failed_requests_are_counted_not_measured():
    bad = RequestRecord(sent=0.0, num_input=5, error="HTTP 500")
    m = summarize([rec(0.0, [1.0, 2.0]), bad], wall_s=2.0)
    assert m["requests"] == 1 and m["failed_requests"] == 1


def test_goodput_counts_requests_meeting_every_slo():
    fast = rec(0.0, [0.1, 0.2, 0.3])     # ttft 100 ms, tpot 100 ms
    slow_first = rec(0.0, [0.9, 1.0])    # ttft 900 ms
    slow_decode = rec(0.0, [0.1, 0.6])   # tpot 500 ms
    m = summarize([fast, slow_first, slow_decode], wall_s=2.0, slo=SLO(ttft_ms=500, tpot_ms=200))
    assert m["goodput_fraction"] == pytest.approx(1 / 3)
    assert m["goodput_req_per_s"] == pytest.approx(0.5)
    assert summarize([fast], 1.0, SLO(e2e_ms=250))["goodput_fraction"] == 0.0


def test_union_length_merges_overlaps():
    assert union_length([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert union_length([]) == 0.0
    assert union_length([(0, 1), (1, 2)]) == pytest.approx(2.0)


def test_hit_rate_from_counter_deltas():
    assert hit_rate_delta((100, 20), (300, 120)) == pytest.approx(0.5)
    assert hit_rate_delta((100, 20), (100, 20)) is None  # nothing queried in the run


def test_usd_per_million_tokens():
    assert usd_per_million(3.6, 1000.0) == pytest.approx(1.0)  # $1/s of... 1000 tok/s at $3.6/h -> $1 per 1M
    assert usd_per_million(None, 1000.0) is None and usd_per_million(1.0, None) is None


def test_spread_across_reps():
    s = spread([10.0, 12.0, 11.0])
    assert (s["min"], s["median"], s["max"], s["reps"]) == (10.0, 11.0, 12.0, 3)
    assert s["rel_spread"] == pytest.approx(2 / 11)


def _run(config, ttft, tpot, e2e, kv):
    d = lambda v: {"p50": v, "p90": v, "p99": v}  # noqa: E731
    return {"config": config, "workload": "w", "workload_spec": "w:x=1", "shape": "s", "arrival": "a",
            "concurrency": 4, "metrics": {"ttft_ms": d(ttft), "tpot_ms": d(tpot), "e2e_ms": d(e2e),
                                          "kv_bytes_per_session": kv, "prefill_tok_per_s": 1000 / ttft,
                                          "decode_tok_per_s": 1000 / tpot, "output_tok_per_s": 1000 / e2e}}


def test_comparison_against_baseline():
    runs = [_run("baseline", 200, 20, 1000, 400), _run("prefix-cache", 50, 20, 500, 300)]
    (c,) = compare_runs(runs)
    assert c["config"] == "prefix-cache" and c["baseline"] == "baseline"
    assert c["memory_reduction"] == pytest.approx(0.25)
    assert c["speedup"] == pytest.approx({"prefill": 4.0, "decode": 1.0, "e2e": 2.0})
    assert c["throughput_ratio"]["prefill"] == pytest.approx(4.0)
