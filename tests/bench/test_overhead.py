"""`python -m tierlm.bench.overhead` on the default model at tiny sizes, against a real `tierlm serve`
subprocess (bench.server_process), and the layering it relies on (server/ never imports bench/)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tierlm
from tierlm.bench import overhead
from tierlm.bench.server_process import ServerProcess, ServerStartError


def test_server_vs_in_process_texts_match(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["--concurrency", "1", "2", "--requests-per-slot", "1", "--max-tokens", "4", "--reps", "1",
            "--kv-cache-memory", "64MiB", "--max-num-seqs", "4", "--json", str(out)]
    assert overhead.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["concurrency"], r["requests"], r["max_tokens"]) for r in rows] == [(1, 4, 4), (2, 4, 4)]
    for r in rows:
        assert r["greedy_match"] and r["texts_differ"] == 0
        assert r["engine_tok_s"] > 0 and r["server_tok_s"] > 0
        assert r["overhead"] == pytest.approx(1 - r["server_tok_s"] / r["engine_tok_s"])  # one rep
        assert r["overhead"] < 1 and r["overhead_range"][0] <= r["overhead"] <= r["overhead_range"][1]
        assert all(v > 0 for v in r["ttft_p50_ms"].values()) and set(r["ttft_p50_ms"]) == {"engine", "server"}
    assert "greedy texts match" in capsys.readouterr().out


def test_engine_flags_reach_the_server_unchanged():
    import argparse

    from tierlm.args import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    a = p.parse_args(["--kv-cache-memory", "64MiB", "--no-prefix-caching", "--dtype", "fp32"])
    flags = overhead.engine_flags(p._actions[1:], a)  # every action but -h
    assert vars(p.parse_args(flags)) == vars(a)


def test_server_process_names_a_failed_start():
    with pytest.raises(ServerStartError, match="unrecognized arguments: --no-such-flag"):
        ServerProcess(["--no-such-flag"], startup_timeout_s=60).start()


def test_server_package_does_not_import_bench():
    server = Path(tierlm.__file__).parent / "server"
    offenders = [f.name for f in server.glob("*.py") if "tierlm.bench" in f.read_text()]
    assert offenders == []
