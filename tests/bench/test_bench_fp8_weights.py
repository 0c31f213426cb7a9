"""`tierlm bench --configs fp8-weights` on an FP8 checkpoint (the default model stored as DeepSeek-V3 stores FP8
weights: tests/helpers/fp8_checkpoint.py): the config runs the stored e4m3 bytes and block scales with fp32
activations, the baseline their fp32 dequantization, so the lossy gate holds at full agreement; with the scales
read the wrong way round (weight_scale_inv divided by) the gate flags it."""
from __future__ import annotations

import json

import pytest

from helpers.bench_cli import run
from helpers.engine_bugs import fp8_scales_inverted
from helpers.fp8_checkpoint import write_fp8_checkpoint


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    from tierlm.models.loader import load_checkpoint

    return write_fp8_checkpoint(load_checkpoint("default").path, tmp_path_factory.mktemp("fp8") / "model")


def _gates(fp8_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(tmp_path / "cache"))  # a fresh quantized-weights cache
    out = tmp_path / "out"
    rc = run(["--model", str(fp8_model), "--workload", "fixed:n=1,isl=32,osl=4", "--configs", "fp8-weights",
              "--reps", "1", "--warmup", "0", "--gate-prompts", "2", "--gate-tokens", "8", "--gate-long-len", "96",
              "--no-peer", "--no-plots", "--out", str(out), "--json", str(out / "r.json")])
    doc = json.loads((out / "r.json").read_text())
    return rc, doc, {g["config"]: g for g in doc["gates"]}


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_fp8_weights_hold_the_gate_on_an_fp8_checkpoint(fp8_model, tmp_path, monkeypatch):
    rc, doc, gates = _gates(fp8_model, tmp_path, monkeypatch)
    gate = gates["fp8-weights"]
    assert not gate["flagged"] and gate["lossy"]["top1_agreement"] == 1.0, gate
    cfg = {c["name"]: c for c in doc["configs"]}
    # linears at 1 byte per weight (+ 1/32 scales) instead of 4; the fp32 embedding and norms stay
    assert cfg["fp8-weights"]["weights_bytes"] < 0.55 * cfg["baseline"]["weights_bytes"]
    assert rc == 0


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (make test-slow), not in make test
def test_the_gate_flags_inverted_block_scales(fp8_model, tmp_path, monkeypatch):
    fp8_scales_inverted(monkeypatch)
    rc, doc, gates = _gates(fp8_model, tmp_path, monkeypatch)
    assert not gates["baseline"]["flagged"]
    assert gates["fp8-weights"]["flagged"] and gates["fp8-weights"]["reason"].startswith("lossy gate:"), gates
    assert rc == 1 and doc["flagged"]
