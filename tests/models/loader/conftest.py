"""Loader test fixtures.

Every test here runs against a private cache root (TIERLM_CACHE_DIR = one session tmp dir), never the
user's real cache. The default model is converted once per session (`default_ckpt`). `make_gguf` writes
tiny GGUF files (2 layers, hidden 64, a 512-token slice of SmolLM2's vocabulary) for fast cases.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tierlm.models.loader as loader
from tierlm.models.loader import load_checkpoint
from tierlm.models.loader.default_model import default_gguf_path
from tierlm.models.loader.gguf import GGUFFile

from tiny_gguf import TINY, gguf_name, llama_cpp_permute, tiny_hf_weights

ENV = "TIERLM_CACHE_DIR"


@pytest.fixture(scope="session")
def loader_cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tierlm-cache")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, loader_cache_root):
    monkeypatch.setenv(ENV, str(loader_cache_root))


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def default_ckpt(loader_cache_root):
    """The default model, converted into the session cache (timed: see `conversion_seconds`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, str(loader_cache_root))
        start = time.perf_counter()
        ckpt = load_checkpoint(None)
        ckpt.conversion_seconds = time.perf_counter() - start
    return ckpt


@pytest.fixture(scope="session")
def default_metadata(default_gguf) -> dict:
    return GGUFFile(default_gguf).metadata


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf):
    """transformers' tokenizer built from the same GGUF (its own GGUF conversion)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def tiny_vocab(default_metadata):
    """The first 512 SmolLM2 tokens (17 specials, 256 bytes, early merges) and the merges they close over."""
    n = TINY["vocab"]
    tokens = default_metadata["tokenizer.ggml.tokens"][:n]
    types = default_metadata["tokenizer.ggml.token_type"][:n]
    have = set(tokens)
    merges = [m for m in default_metadata["tokenizer.ggml.merges"]
              if (lambda a, b: a in have and b in have and a + b in have)(*m.split(" ", 1))]
    return tokens, types, merges


@pytest.fixture
def make_gguf(tmp_path, tiny_vocab, default_metadata):
    """make_gguf(arch="llama", name=..., drop=(), quantize_embedding=True, extra=callable(writer),
    linear_type=None | "Q4_1" | ..., vocab=None | callable(writer)) -> (path, hf_weights). Writes HF weights the
    way llama.cpp would (q/k permuted for llama; the linears in `linear_type` blocks when given); `vocab` writes
    the tokenizer.* keys in place of the SmolLM2 slice (its vocabulary must have TINY["vocab"] tokens)."""
    import gguf

    def make(arch="llama", name="tiny.gguf", drop=(), quantize_embedding=True, tied=True, extra=None,
             head_dim=None, seed=0, linear_type=None, vocab=None):
        t = TINY
        weights = tiny_hf_weights(arch, seed=seed, tied=tied, head_dim=head_dim)
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), arch)
        w.add_name("tiny test model")
        w.add_block_count(t["layers"])
        w.add_context_length(256)
        w.add_embedding_length(t["hidden"])
        w.add_feed_forward_length(t["inter"])
        w.add_head_count(t["heads"])
        w.add_head_count_kv(t["kv_heads"])
        if head_dim:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        if vocab is not None:
            vocab(w)
        else:
            tokens, types, merges = tiny_vocab
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("smollm")
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
            w.add_add_bos_token(False)
            w.add_chat_template(default_metadata["tokenizer.chat_template"])
        if extra:
            extra(w)
        for hf, tensor in weights.items():
            if hf in drop:
                continue
            name_ = gguf_name(hf)
            if arch == "llama" and (".attn_q." in name_ or ".attn_k." in name_):
                tensor = llama_cpp_permute(tensor, t["heads"] if ".attn_q." in name_ else t["kv_heads"])
            arr = tensor.numpy().astype(np.float32)
            if quantize_embedding and name_ == "token_embd.weight":
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(name_, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                weights[hf] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))
            elif linear_type and hf.endswith("_proj.weight"):
                kind = gguf.GGMLQuantizationType[linear_type]
                w.add_tensor(name_, gguf.quants.quantize(arr, kind), raw_dtype=kind)
            else:
                w.add_tensor(name_, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path, weights

    return make


@pytest.fixture
def counted(monkeypatch):
    """Counts conversions (wraps the real converter)."""
    calls = []
    real = loader.convert_gguf

    def convert(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "convert_gguf", convert)
    return calls


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(root))
    return root
