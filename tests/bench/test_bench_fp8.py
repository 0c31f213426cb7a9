"""`tierlm bench --configs fp8` end to end on the default model: the FP8 config runs with a quarter of fp32's
KV bytes per token, its gate runs in lossy (drift-threshold) mode with measured positions, and its runs'
exact diffs are reported but never flag it; an FP8 write path with a broken scale is flagged by that gate
(which is what lets the fp8 config's figures count)."""
from __future__ import annotations

import json

import pytest

from helpers.bench_cli import run
from helpers.engine_bugs import fp8_scale_one_exponent_off


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_tiny_fp8_run_is_gated_in_lossy_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = run(["--workload", "fixed:n=2,isl=48,osl=6", "--configs", "fp8", "--reps", "1", "--warmup", "0",
              "--gate-prompts", "2", "--gate-tokens", "8", "--gate-long-len", "96", "--no-peer", "--no-plots",
              "--out", str(out), "--json", str(out / "r.json")])
    doc = json.loads((out / "r.json").read_text())
    gates = {g["config"]: g for g in doc["gates"]}
    assert gates["baseline"]["lossy"] is None and not gates["baseline"]["flagged"]
    lossy = gates["fp8"]["lossy"]
    assert lossy["positions"] > 20 and 0.5 < lossy["top1_agreement"] <= 1.0 and lossy["kl_mean"] >= 0.0
    assert [c["metric"] for c in lossy["checks"]][:3] == ["top1_agreement", "kl_mean", "kl_p99"]
    assert gates["fp8"]["flagged"] == lossy["flagged"]  # the lossy gate decides, not the exact diff
    assert rc == (1 if doc["flagged"] else 0)
    cfg = {c["name"]: c for c in doc["configs"]}
    assert cfg["fp8"]["kv_bytes_per_token"] == 12_240 and cfg["baseline"]["kv_bytes_per_token"] == 46_080
    fp8_run = next(r for r in doc["runs"] if r["config"] == "fp8")
    assert not fp8_run["check"]["flagged"]
    assert "lossy gate: top-1" in (out / "report.md").read_text()


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_lossy_gate_flags_an_fp8_kv_with_a_broken_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(tmp_path / "cache"))
    fp8_scale_one_exponent_off(monkeypatch)
    out = tmp_path / "out"
    rc = run(["--workload", "fixed:n=1,isl=32,osl=4", "--configs", "fp8", "--reps", "1", "--warmup", "0",
              "--gate-prompts", "2", "--gate-tokens", "8", "--gate-long-len", "96", "--no-peer", "--no-plots",
              "--out", str(out), "--json", str(out / "r.json")])
    doc = json.loads((out / "r.json").read_text())
    gates = {g["config"]: g for g in doc["gates"]}
    assert not gates["baseline"]["flagged"]  # fp32 KV never quantizes: the bug is not on its way
    fp8 = gates["fp8"]
    assert fp8["flagged"] and fp8["reason"].startswith("lossy gate:"), fp8
    failed = {c["metric"] for c in fp8["lossy"]["checks"] if c["status"] == "FAIL"}
    assert {"top1_agreement", "kl_mean"} <= failed, fp8["lossy"]["checks"]
    assert rc == 1 and doc["flagged"]
