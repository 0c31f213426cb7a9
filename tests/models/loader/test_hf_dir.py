"""Hugging Face directories: tiny random-init transformers models saved with save_pretrained, loaded back."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tierlm.models.loader import load_checkpoint
from tierlm.models.loader.weight_layout import expected_weight_shapes

transformers = pytest.importorskip("transformers")

VOCAB = 49152
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-rope": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                                                    tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, rope_theta=10000.0, sliding_window=128,
                                                  tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
}


def _save(family, tmp_path, tokenizer_dir, **save_kwargs):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    out = tmp_path / family
    model.save_pretrained(out, **save_kwargs)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out, model.state_dict()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_hf_models(family, tmp_path, default_ckpt):
    path, state = _save(family, tmp_path, default_ckpt.path)
    ckpt = load_checkpoint(str(path))
    c = ckpt.config
    assert ckpt.source == "hf" and ckpt.path == path and c.model_id == family
    arch = "llama" if family.startswith("llama") else family
    assert c.architecture == arch
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (VOCAB, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads) == (4, 2)
    assert c.head_dim == (32 if arch == "qwen3" else 16)
    assert c.attention_bias == (arch == "qwen2")
    assert c.qk_norm == (arch == "qwen3")
    assert c.tie_word_embeddings == (family in ("llama3-rope", "qwen3"))
    assert c.rope_theta == {"llama": 1e4, "llama3-rope": 5e5, "mistral": 1e4, "qwen2": 1e6, "qwen3": 1e6}[family]
    assert c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 512
    assert c.rope_scaling == (LLAMA3_ROPE if family == "llama3-rope" else None)
    assert c.sliding_window == (128 if family == "mistral" else None)
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert set(ckpt.weights) == set(expected_weight_shapes(c))
    for name, t in ckpt.weights.items():
        assert torch.equal(t, state[name]), name
    assert ckpt.tokenizer.encode("<|im_start|>hi") == [1, 6004]


def test_sharded_checkpoint(tmp_path, default_ckpt):
    path, state = _save("llama", tmp_path, default_ckpt.path, max_shard_size="1MB")
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    ckpt = load_checkpoint(path)
    assert set(ckpt.weights) == set(expected_weight_shapes(ckpt.config))
    for name, t in ckpt.weights.items():
        assert torch.equal(t, state[name]), name


def test_generation_config_and_list_eos(tmp_path, default_ckpt):
    path, _ = _save("llama", tmp_path, default_ckpt.path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [2, 0]
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    ckpt = load_checkpoint(path)
    assert ckpt.config.eos_token_ids == (2, 0, 5)
    assert ckpt.tokenizer.eos_token_ids == ckpt.config.eos_token_ids


def test_chat_template_jinja_file_and_hf_keys(tmp_path, default_ckpt):
    path, _ = _save("qwen3", tmp_path, default_ckpt.path)
    tc = json.loads((path / "tokenizer_config.json").read_text())
    template = tc.pop("chat_template")
    tc["bos_token"] = {"content": "<|im_start|>", "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    (path / "chat_template.jinja").write_text(template)
    tok = load_checkpoint(path).tokenizer
    assert tok.has_chat_template and tok.bos_token_id == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_dir_holding_one_gguf_loads_it(make_gguf):
    path, _ = make_gguf()
    ckpt = load_checkpoint(path.parent)
    assert ckpt.source == "gguf-cache" and ckpt.origin == path
