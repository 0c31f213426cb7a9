"""GGUF reading: config from metadata, dequantized weights in HF names, q/k un-permuted.

The real default model is compared tensor by tensor with transformers' own GGUF loader (which also
reverses llama.cpp's q/k permutation); tiny synthetic GGUFs check the permutation round trip exactly
and the qwen2 / qwen3 names.
"""
from __future__ import annotations

import pytest
import torch

from tierlm.models.loader import load_checkpoint
from tierlm.models.loader.gguf import GGUFFile, unpermute_rows
from tierlm.models.loader.weight_layout import expected_weight_shapes

from tiny_gguf import TINY, llama_cpp_permute


@pytest.fixture(scope="module")
def hf_gguf_state_dict(default_gguf):
    """transformers' dequantized, un-permuted tensors of the same GGUF (no accelerate needed)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    return load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]


def test_default_config(default_ckpt):
    c = default_ckpt.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and not c.attention_bias and not c.qk_norm and c.rope_scaling is None
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert c.model_id == "SmolLM2-135M-Instruct-Q4_1"
    assert default_ckpt.source == "gguf-cache"
    assert default_ckpt.origin.suffix == ".gguf"
    assert (default_ckpt.path / "model.safetensors").exists()


def test_default_weights_names_shapes_dtype(default_ckpt):
    w = default_ckpt.weights
    shapes = expected_weight_shapes(default_ckpt.config)
    assert set(w) == set(shapes)
    assert "lm_head.weight" not in w
    for name, t in w.items():
        assert tuple(t.shape) == shapes[name] and t.dtype == torch.float32, name


def test_default_weights_equal_transformers(default_ckpt, hf_gguf_state_dict):
    ours, theirs = default_ckpt.weights, hf_gguf_state_dict
    assert set(ours) == set(theirs)
    last = default_ckpt.config.num_layers - 1
    for layer in (0, last):  # the un-permuted projections, named explicitly
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert torch.equal(ours[name], theirs[name]), name
    for name in theirs:
        assert torch.equal(ours[name], theirs[name].to(torch.float32)), name


def test_default_q_rows_really_were_permuted(default_ckpt, default_gguf):
    """Guard against a vacuous pass: the raw GGUF rows differ from the un-permuted ones."""
    from gguf.quants import dequantize

    reader = GGUFFile(default_gguf)._reader
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    raw_q = torch.from_numpy(dequantize(raw.data, raw.tensor_type).copy())
    ours = default_ckpt.weights["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(raw_q, ours)
    assert torch.equal(llama_cpp_permute(ours, 9), raw_q)


def test_unpermute_inverts_permute():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    for n_head in (1, 2, 4):
        assert torch.equal(torch.from_numpy(unpermute_rows(llama_cpp_permute(w, n_head).numpy(), n_head)), w)
    b = torch.arange(32.0)
    assert torch.equal(torch.from_numpy(unpermute_rows(llama_cpp_permute(b, 4).numpy(), 4)), b)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_roundtrip(make_gguf, arch):
    head_dim = 32 if arch == "qwen3" else None  # qwen3: explicit attention.key_length != hidden/heads
    path, hf = make_gguf(arch=arch, head_dim=head_dim)
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert c.architecture == arch
    assert c.head_dim == (head_dim or TINY["head_dim"])
    assert c.attention_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert c.model_id == "tiny" and c.tie_word_embeddings
    assert set(ckpt.weights) == set(hf)
    for name, t in hf.items():
        assert torch.equal(ckpt.weights[name], t), name


def test_tiny_untied_has_lm_head(make_gguf):
    path, hf = make_gguf(tied=False)
    ckpt = load_checkpoint(path)
    assert not ckpt.config.tie_word_embeddings
    assert torch.equal(ckpt.weights["lm_head.weight"], hf["lm_head.weight"])


def test_eot_id_joins_eos_only_when_metadata_says_so(make_gguf):
    path, _ = make_gguf(name="eot.gguf", extra=lambda w: w.add_eot_token_id(5))
    ckpt = load_checkpoint(path)
    assert ckpt.config.eos_token_ids == (2, 5)
    assert ckpt.tokenizer.eos_token_ids == (2, 5)
