"""`tierlm bench --configs engram-...` on a V4-mini checkpoint: serving the Engram tables from host memory or a
memory-mapped file (warm or cold, rows prefetched ahead, at step layout or not at all) gives the baseline's
(device-resident) tokens exactly; with host rows read one off the gate flags engram-host and only it, and with stale
rows handed ahead from a mapped table it flags the mmap config that prefetches ahead, only it."""
from __future__ import annotations

import json

import pytest

from helpers.bench_cli import run
from helpers.engine_bugs import engram_host_rows_shifted, engram_mmap_ahead_stale
from helpers.v4mini import write_v4mini


@pytest.fixture(scope="module")
def v4mini(tmp_path_factory):
    return write_v4mini(tmp_path_factory.mktemp("v4mini") / "model")[1]


CONFIGS = ["engram-host", "engram-mmap", "engram-mmap-cold", "engram-mmap-cold-ahead", "engram-mmap-cold-step",
           "engram-mmap-cold-off", "engram-off"]


def _gates(model, tmp_path, configs=CONFIGS):
    out = tmp_path / "out"
    rc = run(["--model", str(model), "--workload", "fixed:n=2,isl=32,osl=8", "--configs", *configs, "--reps", "1", "--warmup", "0", "--gate-prompts", "3", "--gate-tokens", "8",
              "--gate-long-len", "96", "--no-peer", "--no-plots", "--out", str(out), "--json", str(out / "r.json")])
    doc = json.loads((out / "r.json").read_text())
    return rc, doc, {g["config"]: g for g in doc["gates"]}


def test_host_and_mmap_tables_hold_the_exact_gate(v4mini, tmp_path):
    rc, doc, gates = _gates(v4mini, tmp_path)
    assert rc == 0 and not any(g["flagged"] for g in gates.values()), gates
    assert set(CONFIGS) <= set(gates)


def test_the_gate_flags_shifted_host_rows(v4mini, tmp_path, monkeypatch):
    engram_host_rows_shifted(monkeypatch)
    rc, doc, gates = _gates(v4mini, tmp_path, ["engram-host", "engram-mmap"])
    assert gates["engram-host"]["flagged"] and not gates["engram-mmap"]["flagged"], gates
    assert not gates["baseline"]["flagged"] and rc == 1


def test_the_gate_flags_stale_rows_handed_ahead(v4mini, tmp_path, monkeypatch):
    engram_mmap_ahead_stale(monkeypatch)
    rc, doc, gates = _gates(v4mini, tmp_path, ["engram-mmap-cold-ahead", "engram-mmap-cold-step", "engram-off"])
    flagged = {name for name, g in gates.items() if g["flagged"]}
    assert flagged == {"engram-mmap-cold-ahead"} and rc == 1, gates
