"""`tierlm drift` end to end on the default model with --quick (in-process through tierlm.cli.main, plus one
real subprocess for the one-line error), exit codes 0 / 1 / 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tierlm.cli import main


def drift(capsys, *args) -> tuple[int, str, str]:
    rc = main(["drift", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def same_config_run(tmp_path_factory):
    """fp32 against the default reference (fp32 on CPU), every measurement at --quick sizes, with a golden file."""
    d = tmp_path_factory.mktemp("drift")
    paths = {"json": d / "drift.json", "png": d / "drift.png", "golden": d / "golden.json"}
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["drift", "--candidate", "fp32", "--reference", "kv_format=fp32", "--quick",
                   "--json", str(paths["json"]), "--png", str(paths["png"]), "--write-golden", str(paths["golden"])])
    return rc, out.getvalue(), err.getvalue(), paths


def test_same_config_passes_with_zero_kl(same_config_run):
    rc, out, err, paths = same_config_run
    assert rc == 0, out + err
    doc = json.loads(paths["json"].read_text())
    h = doc["results"]["held_out"]
    assert h["kl"] == {"mean": 0.0, "p99": 0.0, "max": 0.0} and h["top1_agreement"] == 1.0
    assert h["top1_agreement_decisive"] == 1.0 and 0 < h["decisive_share"] <= 1 and "leads by >= 0.1 nat" in out
    assert h["perplexity"]["delta"] == 0.0 and h["positions"] == 2 * 16
    assert doc["results"]["greedy"]["exact_match"] == 1.0
    assert doc["results"]["safety"]["agreement"] == 1.0 and doc["results"]["safety"]["agreement_under_load"] == 1.0
    assert all(n["reference_accuracy"] == n["candidate_accuracy"] for n in doc["results"]["needle"].values())
    assert doc["results"]["kv_error"] is None and doc["passed"] and doc["failed"] == []
    assert "top-1 agreement" in out and "drift: pass" in out and "FAIL" not in out
    assert paths["png"].stat().st_size > 1000


def test_fp8_candidate_reports_kl_and_layer_error(capsys, tmp_path):
    toml = tmp_path / "t.toml"  # every limit advisory but one far away: the exit status is about the override
    toml.write_text('max_kl_mean = 100\nmin_top1_agreement = "advisory"\nmax_kl_p99 = "advisory"\n'
                    'max_ppl_delta = "advisory"\n')
    out_json = tmp_path / "d.json"
    rc, out, err = drift(capsys, "--candidate", "fp8_e4m3", "--reference", "kv_format=fp32", "--quick", "--only",
                         "held-out", "--thresholds", str(toml), "--json", str(out_json))
    assert rc == 0, out + err
    doc = json.loads(out_json.read_text())
    assert 0 < doc["results"]["held_out"]["kl"]["mean"] < 1
    kv = doc["results"]["kv_error"]
    assert len(kv["k"]) == 30 and 0 < kv["max_k"] < 0.1 and 0 < kv["max_v"] < 0.1
    assert doc["candidate"]["resolved_kv_format"] == "fp8_e4m3" and doc["thresholds"]["max_kl_mean"] == 100.0
    assert "K/V rel. RMS error" in out


def test_broken_static_scales_exceed_a_threshold(capsys, tmp_path, same_config_run):
    from tierlm.quant.calibration import KVScales, ModelIdentity

    model = json.loads(same_config_run[3]["golden"].read_text())["model"]
    identity = ModelIdentity(model["model_id"], model["weights_digest"], model["config_digest"])
    typical = torch.tensor([10.0, 2.0]).view(1, 2, 1).expand(30, 2, 3)  # |K| ~ 10, |V| ~ 2 on this model
    path = KVScales(identity, (typical * 1e-3).contiguous(), tokens=1).save(tmp_path / "scales.json")  # 1000x too small
    rc, out, err = drift(capsys, "--candidate", f"kv_format=fp8_e4m3_static,kv_scales={path}", "--quick",
                         "--only", "held-out")
    assert rc == 1, out + err
    fail = [line for line in out.splitlines() if line.startswith("drift: FAIL")]
    assert len(fail) == 1 and "kl_mean" in fail[0] and "top1_agreement" in fail[0]


def test_golden_round_trip_passes(capsys, same_config_run):
    golden = same_config_run[3]["golden"]
    doc = json.loads(golden.read_text())
    assert doc["config"]["config"] == "fp32" and doc["torch"] == torch.__version__ and doc["machine"]
    assert all(len(r["logprobs"]) == len(r["tokens"]) for r in doc["prompts"])
    # no --candidate: the config the golden file recorded
    rc, out, err = drift(capsys, "--golden", str(golden), "--quick", "--only", "greedy")
    assert rc == 0, out + err
    assert "golden exact match" in out and "candidate fp32" in out


def test_golden_from_another_model_exits_2(capsys, tmp_path, same_config_run):
    doc = json.loads(same_config_run[3]["golden"].read_text())
    doc["model"] = {"model_id": "other-model", "weights_digest": "0" * 32, "config_digest": "1" * 16}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    rc, out, err = drift(capsys, "--golden", str(other), "--quick", "--only", "greedy")
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("tierlm: error")]
    assert len(lines) == 1 and "another model" in lines[0] and "other-model" in lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--candidate", "fp9"], "unknown KV format 'fp9'"),
    (["--candidate", "kv_fromat=fp32"], "unknown key 'kv_fromat'"),
    (["--candidate", "fp32", "--reference", "dtype=fp64"], "--reference: unknown dtype"),
    (["--candidate", "kv_format=fp8_e4m3,kv_scales=/nonexistent.json"], "only read by a static"),
    (["--quick"], "no candidate config"),
    (["--candidate", "fp32", "--needle-lengths", "1k"], "--needle-lengths"),
    (["--candidate", "fp32", "--only", "vibes"], "--only"),
    (["--candidate", "fp32", "--safety-prompts", "41"], "40 are shipped"),
    (["--candidate", "fp32", "--quick", "--passages", "0"], "--passages 0 < 1"),
    (["--candidate", "fp32", "--only", "held-out", "--write-golden", "g.json"], "add greedy to --only"),
    (["--candidate", "fp32", "--golden", "/nonexistent/golden.json"], "cannot read golden file"),
    (["--candidate", "fp32", "--thresholds", "/nonexistent/t.toml"], "cannot read thresholds file"),
])
def test_bad_input_exits_2_with_one_line(capsys, args, needle):
    rc, out, err = drift(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("tierlm: error:") and needle in err, err


def test_bad_config_from_the_shell():
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "drift", "--candidate", "kv_format=fp8_e4m3,bogus=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown key 'bogus'" in r.stderr and "use keys among" in r.stderr
