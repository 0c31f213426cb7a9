"""KV tier flags on every engine command, `generate --stats` with tiers (a disk hit across processes), and
`tierlm info`'s tier capacity table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tierlm import cli
from tierlm.args import engine_config, tier_config
from tierlm.config import TierConfig

TIER_ARGS = ["--host-cache-memory", "4GiB", "--disk-cache-dir", "/tmp/kv", "--disk-cache-size", "100GiB",
             "--redis-url", "redis://10.0.0.5:6379/2", "--redis-cache-size", "8GiB", "--tier-eviction", "s3fifo",
             "--tier-write", "write_through", "--tier-admit-after-hits", "2", "--tier-load-budget", "64MiB",
             "--tier-load-timeout", "1.5", "--preemption", "offload", "--pin-prefix", "You are a helpful assistant.",
             "--pin-prefix", "System B"]


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_defaults_are_tier_config_defaults():
    for argv in (["generate", "hi"], ["chat"], ["serve"]):
        assert engine_config(parse(*argv)).tiers == TierConfig()


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_tier_flags_build_the_tier_config(tmp_path, command):
    prefix_file = tmp_path / "system.txt"
    prefix_file.write_text("A long system prompt\nwith two lines.\n")
    a = parse(*command, *TIER_ARGS, "--pin-prefix-file", str(prefix_file))
    t = engine_config(a).tiers
    assert t == TierConfig(host_memory_bytes=4 << 30, disk_dir="/tmp/kv", disk_bytes=100 << 30,
                           redis_url="redis://10.0.0.5:6379/2", redis_bytes=8 << 30, eviction_policy="s3fifo",
                           write_policy="write_through", admit_after_hits=2, load_step_budget_bytes=64 << 20,
                           load_timeout_s=1.5, preemption_mode="offload",
                           pinned_prefixes=("You are a helpful assistant.", "System B",
                                            "A long system prompt\nwith two lines.\n"))
    assert t.enabled


def test_tier_config_of_a_namespace_without_tier_flags():
    import argparse

    assert tier_config(argparse.Namespace()) == TierConfig()


@pytest.mark.parametrize("argv, needle", [
    (["--host-cache-memory", "lots"], "not a size"),
    (["--disk-cache-size", "0"], "--disk-cache-size"),
    (["--tier-eviction", "fifo"], "invalid choice: 'fifo'"),
    (["--tier-write", "sometimes"], "--tier-write"),
    (["--preemption", "swap"], "--preemption"),
    (["--tier-admit-after-hits", "-1"], "--tier-admit-after-hits"),
    (["--tier-load-timeout", "0"], "not a positive number of seconds"),
    (["--redis-url", "http://localhost:6379"], "not a redis:// URL"),
    (["--pin-prefix-file", "/nonexistent/prefix.txt"], "cannot read"),
])
def test_bad_tier_flags_are_usage_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        parse("generate", "hi", *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_tiers_without_prefix_caching_exit_2_before_loading(capsys):
    assert cli.main(["generate", "hi", "--no-prefix-caching", "--host-cache-memory", "1GiB"]) == 2
    assert "prefix caching" in capsys.readouterr().err


def test_info_shows_tier_capacity_without_contacting_redis(tmp_path, capsys):
    out_json = tmp_path / "info.json"
    # Nothing listens on port 1: info is arithmetic on the configured sizes, it never connects.
    assert cli.main(["info", "--seq-len", "1000", "--memory", "2GiB", "--kv-format", "fp32",
                     "--host-cache-memory", "1GiB", "--redis-url", "redis://127.0.0.1:1", "--json", str(out_json)]) == 0
    info = json.loads(out_json.read_text())
    assert info["tier_kv_format"] == "fp32"
    rows = {t["tier"]: t for t in info["tiers"]}
    assert set(rows) == {"device", "host", "redis"}  # no disk flag given
    assert rows["host"]["capacity_bytes"] == 1 << 30
    assert rows["host"]["tokens"] == (1 << 30) // 46080
    assert rows["host"]["sessions"] == (1 << 30) // (63 * 16 * 46080) == 23
    assert rows["device"]["sessions"] == 2 * 23
    assert rows["redis"]["capacity_bytes"] == TierConfig().redis_bytes
    printed = capsys.readouterr().out
    host_line = next(line for line in printed.splitlines() if line.strip().startswith("host "))
    assert f"{(1 << 30) // 46080:,}" in host_line and host_line.split()[-1] == "23"


def run_generate(*args):
    return subprocess.run([sys.executable, "-m", "tierlm.cli", "generate", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def cached_line(stderr: str) -> dict[str, int]:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("[stats] cached: "))
    return {name: int(n) for name, n in (part.split() for part in line.removeprefix("[stats] cached: ").split(", "))}


def test_generate_stats_second_process_hits_the_disk_tier(tmp_path):
    prompt = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 10)  # ~140 tokens
    disk = tmp_path / "kv"
    out_json = tmp_path / "out.json"
    args = [prompt, "--max-tokens", "2", "--ignore-eos", "--stats", "--num-kv-blocks", "32",
            "--host-cache-memory", "64MiB", "--disk-cache-dir", str(disk), "--tier-write", "write_through",
            "--json", str(out_json)]
    first = run_generate(*args)
    assert first.returncode == 0, first.stderr
    assert cached_line(first.stderr) == {"device": 0, "host": 0, "disk": 0}
    assert any(disk.rglob("*.kv")), "close() let the queued disk writes land"
    tier_lines = [ln for ln in first.stderr.splitlines() if ln.startswith("[stats] tier ")]
    assert [ln.split()[2] for ln in tier_lines] == ["host:", "disk:"]
    assert all("healthy" in ln and "stored" in ln for ln in tier_lines)

    second = run_generate(*args)  # a new process: empty device pool and host tier, the same disk directory
    assert second.returncode == 0, second.stderr
    split = cached_line(second.stderr)
    assert split["disk"] > 0 and split["device"] == 0 and split["host"] == 0, second.stderr
    data = json.loads(out_json.read_text())
    assert data["cached_tokens_by_tier"] == split
    assert data["cached_tokens"] == sum(split.values())
    assert data["tiers"]["disk"]["hit_tokens"] == split["disk"] and data["tiers"]["disk"]["bytes_loaded"] > 0
    assert data["text"] in first.stdout and data["text"] in second.stdout  # same greedy text from loaded KV
