"""Runtime rollback (engine/drift_guard.py) on the default model: a deliberately broken FP8 scale trips the
guard and new requests then run in the safe format (greedy tokens equal to an fp32 engine's); the trip is
remembered across restarts until re-armed; the reference config (fp32 scored against fp32) never trips it,
and neither does healthy FP8 under the default limits. The window and its limits, checked exactly, on
constructed scores."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.engine_bugs import broken_static_kv_scales

from tierlm import LLM, SamplingParams
from tierlm.config import DriftGuardConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.drift import metrics
from tierlm.engine.drift_guard import DriftGuard, JobScore, ShadowJob, bucketed_kl

TEXT = (Path(__file__).parents[2] / "src/tierlm/bench/data/midsummer_act1.txt").read_text()
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def prompts(n: int, words: int = 60) -> list[str]:
    w = TEXT.split()
    return [" ".join(w[i * words:(i + 1) * words]) for i in range(n)]


@pytest.fixture(scope="module")
def fp32_llm():
    return LLM(num_kv_blocks=96)


@pytest.fixture(scope="module")
def broken_scales(fp32_llm, tmp_path_factory) -> Path:
    """Static FP8 scales 1000x too small for this model: almost every K/V value saturates at +-448."""
    return broken_static_kv_scales(fp32_llm.engine, tmp_path_factory.mktemp("s") / "s.json")


def guard_config(tmp_path: Path, **kw) -> DriftGuardConfig:
    return DriftGuardConfig(**{"fraction": 1.0, "min_tokens": 32, "window_tokens": 256,
                               "state_path": str(tmp_path / "rollback.json"), **kw})


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_reference_config_never_trips(tmp_path):
    """fp32 served, fp32 reference: what the guard measures is rounding between the decode and the prefill
    path, far below any limit, at greedy and at sampled positions alike."""
    llm = LLM(num_kv_blocks=96, drift_guard=guard_config(tmp_path, max_kl_mean=1e-4, min_top1_agreement=0.99))
    try:
        outs = llm.generate(prompts(4), GREEDY)
        outs += llm.generate(prompts(4), SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=3,
                                                        ignore_eos=True))
        guard = llm.engine.drift_guard
        assert guard.wait_idle(120)
        st = guard.status()
        assert not st["tripped"] and st["errors"] == 0, st
        assert st["scored_requests"] == 8 and st["scored_tokens"] == sum(len(t) for t in token_ids(outs)) == 192
        assert st["window"]["kl_mean"] < 1e-6 and st["window"]["top1_agreement"] == 1.0, st
        assert llm.engine.kv_format == "fp32" and not Path(guard.path).exists()
    finally:
        llm.close()


def test_healthy_fp8_does_not_trip_the_default_limits(tmp_path):
    llm = LLM(num_kv_blocks=96, kv_format="fp8_e4m3", drift_guard=guard_config(tmp_path, fraction=0.5))
    try:
        llm.generate(prompts(8), GREEDY)
        guard = llm.engine.drift_guard
        assert guard.wait_idle(120)
        st = guard.status()
        assert st["chosen"] == 4 and st["scored_requests"] == 4, st  # every second request
        assert not st["tripped"] and 0 < st["window"]["kl_mean"] < DriftGuardConfig.max_kl_mean / 4, st
        assert llm.engine.kv_format == "fp8_e4m3"
    finally:
        llm.close()


def test_broken_scale_trips_switches_to_the_safe_format_and_stays_until_rearmed(tmp_path, fp32_llm, broken_scales):
    cfg = guard_config(tmp_path)
    llm = LLM(num_kv_blocks=256, kv_format="fp8_e4m3_static", kv_scales=str(broken_scales), drift_guard=cfg)
    fp8_blocks = llm.engine.num_kv_blocks
    try:
        llm.generate(prompts(4), GREEDY)
        guard = llm.engine.drift_guard
        assert guard.wait_idle(120)
        st = guard.status()
        assert st["tripped"] and "mean KL" in st["reason"] and st["window"]["kl_mean"] > 0.5, st
        state = json.loads(Path(cfg.state_path).read_text())
        assert state["identity"]["kv"].startswith("fp8_e4m3_static@") and state["reason"] == st["reason"]

        # New requests run in fp32 within the same KV bytes: the greedy tokens of an fp32 engine.
        p = prompts(6)[4:]
        assert token_ids(llm.generate(p, GREEDY)) == token_ids(fp32_llm.generate(p, GREEDY))
        eng = llm.engine
        assert eng.kv_format == "fp32" and eng.kv_storage[0].data.dtype == torch.float32
        assert eng.num_kv_blocks == eng.kv_budget_bytes // eng.kv_spec.page_size_bytes < fp8_blocks
        assert guard.status()["chosen"] == 4  # nothing is scored while tripped
    finally:
        llm.close()

    # A restart remembers the trip ...
    again = LLM(num_kv_blocks=256, kv_format="fp8_e4m3_static", kv_scales=str(broken_scales), drift_guard=cfg)
    try:
        assert again.engine.kv_format == "fp32" and "remembered" in again.engine.drift_guard.reason
        # ... until re-armed: then the candidate format is back (and trips again on this broken scale).
        assert again.engine.rearm_drift_guard() is True and not Path(cfg.state_path).exists()
        again.generate(prompts(1), GREEDY)
        assert again.engine.kv_format == "fp8_e4m3_static"
    finally:
        again.close()
    rearmed = LLM(num_kv_blocks=256, kv_format="fp8_e4m3_static", kv_scales=str(broken_scales),
                  drift_guard=DriftGuardConfig(**{**cfg.__dict__, "rearm": True}))
    try:
        assert rearmed.engine.kv_format == "fp8_e4m3_static" and not rearmed.engine.drift_guard.tripped
    finally:
        rearmed.close()


def test_a_waiting_request_runs_after_the_switch_and_running_ones_finish_in_the_candidate_format(tmp_path,
                                                                                                broken_scales):
    """The switch waits for running requests to drain; requests added meanwhile wait, then run in fp32."""
    llm = LLM(num_kv_blocks=256, kv_format="fp8_e4m3_static", kv_scales=str(broken_scales),
              drift_guard=guard_config(tmp_path, min_tokens=16, window_tokens=16))
    eng = llm.engine
    try:
        eng.add_request(prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), "a")
        eng.add_request(prompts(2)[1], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), "b")
        while "a" in eng.groups:
            eng.step()
        assert eng.drift_guard.wait_idle(120) and eng.drift_guard.tripped
        eng.add_request(prompts(3)[2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), "c")
        formats = set()
        while eng.has_unfinished_requests():
            eng.step()
            formats.add((eng.kv_format, "b" in eng.groups, "c" in eng.groups))
        # while "b" still ran, the pool stayed FP8 and "c" waited; after it, fp32
        assert ("fp8_e4m3_static", True, True) in formats and ("fp32", False, True) in formats
        assert ("fp32", True, True) not in formats
    finally:
        llm.close()


# ---- the top-k KL the guard measures ------------------------------------------------------------------
def test_bucketed_kl_is_the_full_kl_with_all_tokens_and_a_lower_bound_with_fewer():
    torch.manual_seed(1)
    ref, cand = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    full = metrics.kl_divergence(ref, cand)
    lq = torch.log_softmax(cand.double(), -1)
    for k in (50, 10, 1):
        values, ids = lq.topk(k, dim=-1)
        b = bucketed_kl(ref, values.float(), ids)
        if k == 50:
            torch.testing.assert_close(b, full, rtol=1e-5, atol=1e-7)
        else:
            assert (b <= full + 1e-9).all() and (b >= 0).all()
    same = torch.log_softmax(ref.double(), -1).topk(5, dim=-1)
    assert bucketed_kl(ref, same.values, same.indices).abs().max() < 1e-9


def test_bucketed_kl_of_a_known_pair():
    # reference [0.5, 0.25, 0.25]; candidate keeps token 0 at 0.25 (rest 0.75): buckets {0} and {1, 2}
    ref = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    kl = bucketed_kl(ref, torch.tensor([[math.log(0.25)]], dtype=torch.float64), torch.tensor([[0]]))
    expect = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.item() == pytest.approx(expect, abs=1e-12)
    with pytest.raises(ValueError, match="top-k"):
        bucketed_kl(ref, torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long))


# ---- the window and its limits, on constructed scores ------------------------------------------------------
@pytest.fixture
def bare_guard(tmp_path):
    guards = []

    def make(**kw):
        cfg = DriftGuardConfig(**{"fraction": 1.0, "state_path": str(tmp_path / f"state{len(guards)}.json"), **kw})
        g = DriftGuard(cfg, scorer=None, identity={"model": "m", "kv": "fp8"}, device=torch.device("cpu"))
        guards.append(g)
        return g

    yield make
    for g in guards:
        g.close()


def test_limits_trip_exactly_past_their_values(bare_guard):
    g = bare_guard(max_kl_mean=0.5, min_top1_agreement=0.75, min_tokens=20, window_tokens=20)
    g._record(JobScore(10, 6.0, 10))  # KL 0.6 a token, but 10 tokens are too few to decide on
    assert not g.tripped
    g._record(JobScore(10, 0.0, 10))  # window 20 tokens: KL 0.3
    g._record(JobScore(10, 0.0, 10))  # the first request rolls out: KL 0
    g._record(JobScore(10, 10.0, 10))  # KL exactly 0.5: at the limit is allowed
    assert not g.tripped and g.window() == {"tokens": 20, "requests": 2, "kl_mean": 0.5, "top1_agreement": 1.0}
    g._record(JobScore(10, 0.0002, 10))  # (10 + 0.0002) / 20 > 0.5
    assert g.tripped and g.reason.startswith("mean KL 0.5000 > 0.5") and g.counters["trips"] == 1

    t = bare_guard(max_kl_mean=1.0, min_top1_agreement=0.75, min_tokens=8, window_tokens=8)
    t._record(JobScore(8, 0.0, 6))  # top-1 exactly 0.75
    assert not t.tripped
    t._record(JobScore(8, 0.0, 5))
    assert t.tripped and "top-1 agreement 0.6250 < 0.75" in t.reason


def test_sampling_is_every_nth_request_and_stops_while_tripped(bare_guard):
    g = bare_guard(fraction=0.25, min_tokens=1, window_tokens=1)
    assert [g.want() for _ in range(8)] == [False, False, False, True] * 2
    g._record(JobScore(1, 5.0, 0))
    assert g.tripped and not any(g.want() for _ in range(8))
    assert g.rearm() is True and g.rearm() is False and not g.tripped and g.window()["tokens"] == 0


def test_state_file_names_model_and_format_and_survives_only_as_a_valid_file(bare_guard, tmp_path, caplog):
    g = bare_guard(min_tokens=1, window_tokens=1)
    g._record(JobScore(4, 40.0, 0))
    path = Path(g.path)
    assert g.tripped and json.loads(path.read_text())["identity"] == {"model": "m", "kv": "fp8"}
    assert bare_guard(state_path=str(path)).tripped  # same model and format: remembered
    other = DriftGuard(DriftGuardConfig(fraction=1.0, state_path=str(path)), None, {"model": "m", "kv": "bf16"},
                       torch.device("cpu"))
    other.close()
    assert not other.tripped and path.exists()  # another format's trip is not this one's
    path.write_text("{not json")
    assert not bare_guard(state_path=str(path)).tripped and "unreadable state file" in caplog.text
    path.write_text(json.dumps({"identity": {"model": "m", "kv": "fp8"}, "reason": "x"}))
    assert not bare_guard(state_path=str(path), rearm=True).tripped and not path.exists()


@pytest.mark.parametrize("kw, match", [
    ({"fraction": 1.5}, "fraction"), ({"fraction": 0.1, "min_top1_agreement": 2.0}, "limits"),
    ({"fraction": 0.1, "top_k": 0}, "positive"), ({"fraction": 0.1, "min_tokens": 64, "window_tokens": 32}, "window"),
])
def test_bad_guard_configs_name_the_fix(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        DriftGuardConfig(**kw)


def test_rearm_without_a_guard_is_a_clear_error(fp32_llm):
    with pytest.raises(InvalidParameterError, match="drift guard is off"):
        fp32_llm.engine.rearm_drift_guard()


def test_the_worker_runs_one_thread_and_leaves_the_process_thread_count_alone(tmp_path):
    """The worker scores with one intra-op thread, and its torch.set_num_threads(1) does not become the count
    of threads started later (an engine loop started after the guard would run single-threaded)."""
    import threading

    class CountingScorer:  # records the thread count its scoring sees
        seen: list[int] = []

        def score(self, job):
            self.seen.append(torch.get_num_threads())
            return JobScore(len(job.output_ids), 0.0, len(job.output_ids))

    before = torch.get_num_threads()
    scorer = CountingScorer()
    g = DriftGuard(DriftGuardConfig(fraction=1.0, state_path=str(tmp_path / "s.json")), scorer, {"m": 1},
                   torch.device("cpu"))
    try:
        seen = {}

        def probe():
            torch.ones(1 << 16).sum()
            seen["new"] = torch.get_num_threads()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        assert torch.get_num_threads() == before and seen["new"] == before
        job = ShadowJob("r", [1, 2], [3], torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long))
        assert g.submit(job) and g.wait_idle(30)
        assert scorer.seen == [1] and g.counters["scored_tokens"] == 1
    finally:
        g.close()
