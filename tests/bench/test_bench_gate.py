"""The correctness gate catches divergence and repeated-token loops."""
from tierlm.bench.gate import compare, first_divergence, has_repeat_anomaly

REF = [[5, 6, 7, 8, 9, 2], [11, 12, 13, 2], [20, 21, 22, 23, 24, 25, 26]]


def test_identical_outputs_pass():
    g = compare("prefix-cache", REF, [list(r) for r in REF])
    assert not g.flagged and g.exact_match == 3 and g.first_divergence is None and g.reason == "ok"


def test_injected_divergence_is_flagged_with_its_position():
    cand = [list(r) for r in REF]
    cand[1][2] = 999  # one token flipped in prompt 1 at position 2
    g = compare("fp8-kv", REF, cand)
    assert g.flagged and g.exact_match == 2 and g.first_divergence == 2 and g.diverged_prompts == [1]
    assert "1/3 prompts diverge" in g.reason


def test_tolerance_allows_configured_drift():
    cand = [list(r) for r in REF]
    cand[0][-1] = 3
    assert not compare("sparse", REF, cand, tolerance=1).flagged
    assert compare("sparse", REF, cand, tolerance=0).flagged


def test_length_mismatch_diverges_at_the_shorter_length():
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([1, 2], [1, 2]) is None


def test_repeat_anomaly_detection():
    assert has_repeat_anomaly([1, 2] + [7] * 9)
    assert has_repeat_anomaly([4, 5, 6] * 4)  # period 3 for 9 tokens past its first copy
    assert not has_repeat_anomaly(list(range(40)))
    assert not has_repeat_anomaly([7] * 8)  # 7 repeats past the first: below the threshold


def test_a_config_that_starts_looping_is_flagged_even_if_the_reference_differs_little():
    ref = [list(range(20))]
    cand = [list(range(5)) + [9] * 15]
    g = compare("broken", ref, cand, tolerance=1)
    assert g.flagged and g.repeat_anomalies == 1 and g.reference_repeat_anomalies == 0
    assert "repeated-token loops" in g.reason


def _doc(flagged):
    g = compare("prefix-cache", REF, [list(r) for r in REF] if not flagged else [[0]] * 3).to_dict()
    d = {"p50": 1.0, "p90": 1.0, "p99": 1.0}
    run = {"config": "prefix-cache", "workload": "fixed", "workload_spec": "fixed:n=1", "arrival": "c1",
           "concurrency": 1, "rate": None, "metrics": {"ttft_ms": d, "tpot_ms": d, "itl_ms": d, "e2e_ms": d},
           "correctness": g}
    return {"workloads": [{"name": "fixed", "spec": "fixed:n=1", "shape": "1 x 8 in / 4 out"}], "runs": [run],
            "comparisons": [], "correctness": [g], "environment": {}, "peers": {}}


def test_flagged_configs_are_red_in_the_terminal_and_the_report():
    from tierlm.bench.headline import RED, render_text
    from tierlm.bench.report import render_markdown

    bad, good = _doc(True), _doc(False)
    assert RED in render_text(bad, color=True) and "FLAGGED" in render_text(bad, color=False)
    assert RED not in render_text(good, color=True)
    md = render_markdown(bad, [], None)
    assert 'color:red' in md and "FLAGGED" in md
    assert "color:red" not in render_markdown(good, [], None)
