"""`tierlm bench --configs engram-host engram-mmap` on a V4-mini checkpoint: serving the Engram tables from host
memory or a memory-mapped file gives the baseline's (device-resident) tokens exactly; with host rows read one off,
the gate flags engram-host and only it."""
from __future__ import annotations

import json

import pytest

from helpers.bench_cli import run
from helpers.engine_bugs import engram_host_rows_shifted
from helpers.v4mini import write_v4mini


@pytest.fixture(scope="module")
def v4mini(tmp_path_factory):
    return write_v4mini(tmp_path_factory.mktemp("v4mini") / "model")[1]


def _gates(model, tmp_path):
    out = tmp_path / "out"
    rc = run(["--model", str(model), "--workload", "fixed:n=2,isl=32,osl=8", "--configs", "engram-host",
              "engram-mmap", "--reps", "1", "--warmup", "0", "--gate-prompts", "3", "--gate-tokens", "8",
              "--gate-long-len", "96", "--no-peer", "--no-plots", "--out", str(out), "--json", str(out / "r.json")])
    doc = json.loads((out / "r.json").read_text())
    return rc, doc, {g["config"]: g for g in doc["gates"]}


def test_host_and_mmap_tables_hold_the_exact_gate(v4mini, tmp_path):
    rc, doc, gates = _gates(v4mini, tmp_path)
    assert rc == 0 and not any(g["flagged"] for g in gates.values()), gates
    assert {"engram-host", "engram-mmap"} <= set(gates)


def test_the_gate_flags_shifted_host_rows(v4mini, tmp_path, monkeypatch):
    engram_host_rows_shifted(monkeypatch)
    rc, doc, gates = _gates(v4mini, tmp_path)
    assert gates["engram-host"]["flagged"] and not gates["engram-mmap"]["flagged"], gates
    assert not gates["baseline"]["flagged"] and rc == 1
