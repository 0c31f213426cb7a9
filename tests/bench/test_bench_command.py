"""`tierlm bench` end to end: bad input fails fast with one line, a tiny run writes the JSON, report and
plots, a flagged gate exits 1, Ctrl-C keeps what was measured."""
import json
import os
import subprocess
import sys

import pytest

from helpers.bench_cli import parse, run
from tierlm.core.errors import TierlmError

TINY = ["--quick", "--workload", "fixed:n=2,isl=24,osl=4", "--concurrency", "2", "--gate-prompts", "2",
        "--gate-tokens", "6", "--gate-long-len", "96", "--warmup", "1", "--kv-cache-memory", "64MiB"]


@pytest.fixture
def no_engine(monkeypatch):
    """Any attempt to build an engine fails the test: errors must come before work starts."""
    from tierlm.engine import llm_engine

    def boom(*args, **kwargs):
        raise AssertionError("an engine was built before the input was validated")

    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", boom)


@pytest.mark.parametrize("argv,fragment", [
    (["--workload", "nope"], "unknown workload 'nope'"),
    (["--config", "fp8-kv"], "unknown config 'fp8-kv'"),
    (["--workload", "fixed:isl=9000,osl=16"], "but the context is 8192"),
    (["--workload", "fixed:isl=100,osl=10", "--max-model-len", "64"], "but the context is 64"),
    (["--peer-url", "http://127.0.0.1:9"], "cannot reach the server at http://127.0.0.1:9"),
    (["--concurrency", "0"], "concurrency 0 < 1"),
    (["--rate", "-2"], "request rate -2.0 <= 0"),
])
def test_bad_input_is_one_line_before_any_work(argv, fragment, tmp_path, no_engine):
    with pytest.raises(TierlmError) as e:
        run([*argv, "--out", str(tmp_path / "out")])
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and "(" in msg  # problem (fix)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, no_engine):
    with pytest.raises(TierlmError, match="CUDA is not available"):
        run(["--device", "cuda", "--out", str(tmp_path)])


def test_unwritable_output_path_fails_first(tmp_path, no_engine):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TierlmError, match="cannot write the output directory"):
        run(["--out", str(blocker / "sub")])
    with pytest.raises(TierlmError, match="cannot write the JSON directory"):
        run(["--out", str(tmp_path / "ok"), "--json", str(blocker / "r.json")])


def test_importing_the_command_does_not_import_torch():
    code = "import sys, tierlm.bench.command; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_tiny_quick_run_writes_json_report_and_plots(tmp_path, capsys, stub):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    rc = run([*TINY, "--config", "prefix-cache", "--peer-prefill-len", "32", "--peer-new-tokens", "4",
              "--peer-batch", "2", "--usd-per-hour", "0.5", "--slo-ttft-ms", "60000", "--peer-url", stub.url,
              "--out", str(out), "--json", str(out / "r.json")])
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["incomplete"] is False and doc["flagged"] == []
    assert [r["config"] for r in doc["runs"]] == ["baseline", "prefix-cache", "http:tierlm-serve", f"http:{stub.url}"]
    base, pc, serve, http = doc["runs"]
    assert base["cache_hit_rate"]["device"] is None  # no prefix cache in the reference
    assert pc["cache_hit_rate"]["host"] is None  # tier absent
    m = base["metrics"]
    assert m["output_tok_per_s"] > 0 and base["memory"]["kv_bytes_per_token"] == 46080
    assert m["usd_per_million_tokens"] > 0 and m["goodput_fraction"] == 1.0
    assert base["steps"]["decode_tokens"] > 0 and base["steps"]["decode_s"] > 0
    mem = base["memory"]
    assert mem["weights_bytes"] > 500e6 and mem["activations_peak_bytes"] > 0 and mem["peak_kv_bytes"] > 0
    assert mem["max_sessions_at_budget"] > 0 and mem["peak_rss_bytes"] > mem["weights_bytes"]
    assert base["check"] is not None and pc["check"]["requests"] == 2 and pc["check"]["exact_match"] == 2
    assert len(base["per_rep"]) == 2  # --quick: two repetitions, so every ratio has a spread
    assert serve["driver"] == http["driver"] == "http" and serve["metrics"]["output_tokens"] == 16  # 2 reps
    assert http["metrics"]["requests"] == 4 and http["metrics"]["output_tokens"] == 16
    assert http["cache_hit_rate"]["device"] == pytest.approx(4 / 24)  # stub: 4 cached of 24 sent, twice
    assert http["check"] is None and stub.bodies[-1]["model"] == "stub-model"
    c, h = doc["comparisons"]
    assert c["config"] == "prefix-cache" and c["reference"] == "baseline" and c["ttft_x"]["value"] > 0
    assert c["ttft_x"]["lo"] is not None and c["ttft_x"]["lo"] <= c["ttft_x"]["hi"]
    assert h["config"] == f"http:{stub.url}" and h["reference"] == "http:tierlm-serve" and h["e2e_x"]["value"] > 0
    gates = {g["config"]: g for g in doc["gates"]}
    assert set(gates) == {"baseline", "prefix-cache"} and not any(g["flagged"] for g in gates.values())
    assert gates["prefix-cache"]["vs_reference"]["exact_match"] == gates["prefix-cache"]["vs_reference"]["prompts"] > 4
    assert gates["baseline"]["vs_transformers"]["exact_match"] == gates["baseline"]["vs_transformers"]["prompts"]
    assert all(g["engine"]["preemptions"] > 0 for g in gates.values())  # the gate's pool is tight for every config
    assert gates["prefix-cache"]["engine"]["evictions"] > 0 and gates["prefix-cache"]["engine"]["prefix_hit_tokens"] > 0
    assert doc["environment"]["seed"] == 0 and len(doc["environment"]["config_digest"]) == 16
    phases = doc["peers"]["phases"]
    assert {r["phase"] for r in phases} == {"prefill", "decode", "e2e"} and all(r["ratio"] > 0 for r in phases)
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "## Correctness gate" in report and "## Memory" in report
    assert list(out.glob("latency_cdf_*.png")) and list(out.glob("throughput_*.png"))
    printed = capsys.readouterr().out
    assert "workload fixed" in printed and "transformers" in printed


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_a_flagged_gate_exits_1_and_is_red(tmp_path, capsys, monkeypatch):
    from helpers.engine_bugs import chunk_boundary_off_by_one

    chunk_boundary_off_by_one(monkeypatch)
    out = tmp_path / "out"
    argv = [*TINY, "--config", "chunked-prefill", "--no-peer", "--no-plots", "--out", str(out),
            "--json", str(out / "r.json")]
    assert run(argv) == 1
    doc = json.loads((out / "r.json").read_text())
    assert doc["flagged"] == ["chunked-prefill"]
    assert "FLAGGED" in capsys.readouterr().out and "color:red" in (out / "report.md").read_text()
    assert run([*argv, "--allow-flagged"]) == 0


def test_ctrl_c_writes_partial_results_marked_incomplete(tmp_path, monkeypatch):
    from tierlm.bench import runner

    real = runner.run_engine
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second config's first measured run
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_engine", interrupted)
    out = tmp_path / "out"
    rc = run([*TINY, "--config", "prefix-cache", "--no-peer", "--no-plots", "--reps", "1", "--out", str(out),
              "--json", str(out / "r.json")])
    assert rc == 130
    doc = json.loads((out / "r.json").read_text())
    assert doc["incomplete"] is True and doc["stopped_during"].startswith("prefix-cache")
    assert doc["runs"][0]["config"] == "baseline" and not doc["runs"][0]["incomplete"]
    assert doc["runs"][-1]["incomplete"] is True
    assert "INCOMPLETE" in (out / "report.md").read_text()
