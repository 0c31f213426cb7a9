"""Parity with Hugging Face transformers on tiny random-init models of each supported family.

Each model is saved as a Hugging Face directory (config.json + safetensors + the default model's
tokenizer files), loaded through tierlm's loader, and run through the full engine (paged KV cache,
chunked prefill, batching). Logits must be close and greedy tokens identical.
"""
from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.models.loader import load_checkpoint  # noqa: E402

VOCAB = 49152
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.3,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_theta=10000.0),
    "llama3-rope": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, rope_theta=1000000.0),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, rope_theta=1000000.0),
}


@pytest.fixture(scope="module")
def tokenizer_dir():
    return load_checkpoint(None).path


def _save_tiny(family, tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    cfg = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zero/one-initialised: randomise so they matter
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path / family
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return model, out


PROMPTS = ["Hello world, this is a test of", "1 2 3 4 5 6 7", "a" * 40, "The quick brown fox jumps over the lazy dog " * 5]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_matches_transformers(family, tmp_path, tokenizer_dir):
    ref, path = _save_tiny(family, tmp_path, tokenizer_dir)
    llm = LLM(str(path), dtype="fp32", device="cpu", kv_cache_memory=16 << 20, max_num_batched_tokens=24)
    tok = llm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5))
    for prompt, out in zip(ids, outs):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
            logits = ref(torch.tensor([prompt + out.outputs[0].token_ids])).logits[0].float()
        assert out.outputs[0].token_ids == hf
        ref_lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)  # [12, V]: the distribution at each step
        for step, lps in enumerate(out.outputs[0].logprobs):
            for lp in lps:
                assert abs(lp.logprob - ref_lp[step, lp.token_id].item()) < 1e-4, (family, step)
