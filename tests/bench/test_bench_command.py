"""`tierlm bench` end to end: bad input fails fast with one line, a tiny run's JSON validates, Ctrl-C keeps
what was measured."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from tierlm.bench.command import add_parser
from tierlm.bench.results import validate
from tierlm.core.errors import TierlmError

TINY = ["--quick", "--workload", "fixed:n=2,isl=24,osl=4", "--concurrency", "2", "--gate-prompts", "2",
        "--gate-tokens", "6", "--warmup", "1", "--kv-cache-memory", "64MiB"]


def parse(argv):
    p = argparse.ArgumentParser(prog="tierlm")
    add_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["bench", *argv])
    a.argv = ["bench", *argv]
    return a


def run(argv):
    a = parse(argv)
    return a.func(a)


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


def test_tiny_quick_run_writes_valid_json_report_and_plots(tmp_path, capsys, stub):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    rc = run([*TINY, "--config", "prefix-cache", "--peer-prefill-len", "32", "--peer-new-tokens", "4",
              "--peer-batch", "2", "--usd-per-hour", "0.5", "--slo-ttft-ms", "60000", "--peer-url", stub.url,
              "--out", str(out), "--json", str(out / "r.json")])
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert validate(doc) == []
    assert doc["incomplete"] is False
    assert [r["config"] for r in doc["runs"]] == ["baseline", "prefix-cache", f"http:{stub.url}"]
    base, pc, http = doc["runs"]
    assert base["metrics"]["cache_hit_rate"]["device"] is None  # no prefix cache in the reference
    assert pc["metrics"]["cache_hit_rate"]["host"] is None  # tier absent
    assert base["metrics"]["output_tok_per_s"] > 0 and base["metrics"]["kv_bytes_per_token"] == 46080
    assert base["metrics"]["usd_per_million_tokens"] > 0 and base["metrics"]["goodput_fraction"] == 1.0
    assert base["correctness"]["prompts"] == 2 and base["correctness"]["exact_match"] == 2
    assert http["driver"] == "http" and http["metrics"]["requests"] == 2 and http["metrics"]["output_tokens"] == 8
    assert http["metrics"]["cache_hit_rate"]["device"] == pytest.approx(4 / 24)  # stub: 4 cached of 24 sent
    assert http["correctness"]["prompts"] == 0 and stub.bodies[-1]["model"] == "stub-model"
    c, h = doc["comparisons"]
    assert c["config"] == "prefix-cache" and set(c["speedup"]) >= {"prefill", "decode", "e2e"}
    assert h["config"] == f"http:{stub.url}" and h["speedup"]["e2e"] > 0
    assert doc["environment"]["seed"] == 0 and len(doc["environment"]["config_digest"]) == 16
    peer = doc["peers"]["transformers"]
    assert {r["phase"] for r in peer["ratios"]} == {"prefill", "decode", "e2e"}
    assert all(r["ratio"] and r["ratio"] > 0 for r in peer["ratios"])
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "## Correctness gate" in report
    assert list(out.glob("latency_cdf_*.png")) and list(out.glob("throughput_*.png"))
    printed = capsys.readouterr().out
    assert "workload fixed" in printed and "transformers" in printed


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
    rc = run([*TINY, "--config", "prefix-cache", "--no-peer", "--no-plots", "--out", str(out),
              "--json", str(out / "r.json")])
    assert rc == 130
    doc = json.loads((out / "r.json").read_text())
    assert doc["incomplete"] is True and doc["stopped_during"].startswith("prefix-cache")
    assert validate(doc) == []
    assert doc["runs"][0]["config"] == "baseline" and not doc["runs"][0]["incomplete"]
    assert doc["runs"][-1]["incomplete"] is True
    assert "INCOMPLETE" in (out / "report.md").read_text()
