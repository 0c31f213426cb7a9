"""The `tierlm` command line as a user runs it: real subprocesses, exit codes, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def run(*args, timeout=300, **env_overrides):
    env = dict(os.environ, **env_overrides)
    return subprocess.run([sys.executable, "-m", "tierlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_greedy_with_stats_and_json(tmp_path, default_llm):
    from tierlm import SamplingParams

    out_json = tmp_path / "out.json"
    r = run("generate", "The capital of France is", "--max-tokens", "8", "--ignore-eos", "--stats", "--json", str(out_json))
    assert r.returncode == 0, r.stderr
    data = json.loads(out_json.read_text())
    ref = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert data["token_ids"] == ref.outputs[0].token_ids
    assert data["text"] in r.stdout
    assert "prompt_tokens=" in r.stderr and "cached_tokens=" in r.stderr and "ttft_ms=" in r.stderr


def test_info_json_matches_spec(tmp_path):
    out_json = tmp_path / "info.json"
    r = run("info", "--seq-len", "1000", "--memory", "1GiB", "--json", str(out_json))
    assert r.returncode == 0, r.stderr
    info = json.loads(out_json.read_text())
    assert info["layers"] == 30 and info["kv_heads"] == 3 and info["head_dim"] == 64
    by = {f["kv_format"]: f for f in info["kv_formats"]}
    assert by["bf16"]["bytes_per_token"] == 23040
    assert by["fp32"]["bytes_per_token"] == 46080
    # 1 GiB / (1000 tokens -> 63 blocks of 16 x 46080 B) = 23 sessions in fp32.
    assert by["fp32"]["max_sessions_at_budget"] == (1 << 30) // (63 * 16 * 46080)
    assert "bytes/token" in r.stdout
    from tierlm.kernels import cpu as cpu_kernels

    assert info["cpu_kernels"]["native"] == cpu_kernels.usable(torch.zeros(1))  # what this process got too


def test_info_says_why_the_cpu_kernels_are_off(tmp_path):
    out_json = tmp_path / "info.json"
    r = run("info", "--json", str(out_json), TIERLM_CPU_KERNELS="0")
    assert r.returncode == 0, r.stderr
    k = json.loads(out_json.read_text())["cpu_kernels"]
    assert k == {"native": False, "library": None, "reason": "turned off by TIERLM_CPU_KERNELS=0"}
    assert "PyTorch paths (turned off by TIERLM_CPU_KERNELS=0)" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "not found"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["info", "--memory", "lots"], "not a size"),
    (["generate", "hi", "--sparse", "indexer"], "needs a model with trained lightning-indexer weights"),
    (["generate", "hi", "--sparse", "quest", "--sparse-budget", "32"], "raise --sparse-budget"),
    (["bench", "--claims", "--claims-contexts", "64"], "--claims-contexts"),
    (["generate", "hi", "--sparse-spill", "1GiB"], "add --sparse quest"),
    (["generate", "hi", "--sparse", "quest", "--sparse-spill", "1GiB", "--num-kv-blocks", "64",
      "--sparse-staging", "2048", "--attention-backend", "torch"], "lower --sparse-staging"),  # cpu: no staging
    (["generate", "hi", "--quantization", "int4", "--quant-group", "128"],
     "has 576 inputs, not a multiple of the int4 group 128 (use a group that divides 576 (e.g. 64))"),
    (["generate", "hi", "--quantization", "q4_1", "--quant-group", "64"], "--quant-group applies to --quantization int4"),
])
def test_user_errors_exit_2_with_one_line(args, needle):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_gguf_exits_2(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(2000))
    r = run("generate", "hi", "--model", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tierlm: error:" in r.stderr


def test_chat_streams_replies_and_keeps_history(default_llm):
    from tierlm import SamplingParams

    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "chat", "--max-tokens", "12", "--ignore-eos"],
                       input="What is 2+2?\nAnd 3+3?\n\n", capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    first = default_llm.chat([{"role": "user", "content": "What is 2+2?"}],
                             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    assert first.strip() and first.strip() in r.stdout
    assert r.stdout.count("> ") >= 3  # prompted for each turn and for the final empty line
