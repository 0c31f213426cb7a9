"""Llama 3.1/3.2 GGUFs: rope_freqs.weight (llama.cpp's per-frequency RoPE divisors) instead of rope_scaling.

The tiny GGUFs here carry the factors llama.cpp's converter writes for a llama3 rope_scaling (its formula,
reimplemented below from the converter's description); loaded, they must give the inverse frequencies of
rope_inv_freq(..., llama3 scaling) and the same logits as the model with Hugging Face's llama3 rope_scaling.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.models.layers import rope_inv_freq
from tierlm.models.loader import load_checkpoint
from tierlm.models.loader.config_json import model_config_from_hf, model_config_to_hf
from tierlm.models.loader.gguf import GGUFFile

from tiny_gguf import TINY

THETA = 10000.0  # make_gguf's rope.freq_base
HEAD_DIM = TINY["head_dim"]
# Wavelengths at head_dim 16 / theta 1e4 run 6.3 .. 19869: with these params one frequency is kept, two fall in
# the smooth band and five are divided by 8.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def llama_cpp_rope_factors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for a llama3 rope_scaling: 1 for short wavelengths,
    `factor` for long ones, 1 / ((1 - smooth) / factor + smooth) between; stored as float32."""
    old_ctx, lo, hi, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                               s["factor"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


FACTORS = llama_cpp_rope_factors(HEAD_DIM, THETA, LLAMA3)


def _with_freqs(factors, *more):
    def extra(w):
        w.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
        for f in more:
            f(w)
    return extra


def test_factors_cover_every_band():
    assert FACTORS[0] == 1.0 and FACTORS[-1] == 8.0
    assert ((FACTORS > 1) & (FACTORS < 8)).sum() == 2


def test_config_carries_the_factors(make_gguf):
    path, _ = make_gguf(name="rope-freqs.gguf", extra=_with_freqs(FACTORS))
    c = GGUFFile(path).config()
    assert c.rope_scaling == {"rope_type": "freq_factors", "factors": [float(f) for f in FACTORS]}
    ours = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    llama3 = rope_inv_freq(HEAD_DIM, THETA, LLAMA3)
    torch.testing.assert_close(ours, llama3, rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inv_freq(HEAD_DIM, THETA, None))


def test_freq_factors_survive_config_json(make_gguf):
    path, _ = make_gguf(name="rope-freqs.gguf", extra=_with_freqs(FACTORS))
    c = GGUFFile(path).config()
    cfg = json.loads(json.dumps(model_config_to_hf(c)))
    assert model_config_from_hf(cfg, where="config.json", model_id=c.model_id) == c


def test_load_checkpoint(make_gguf):
    path, hf = make_gguf(name="rope-freqs.gguf", extra=_with_freqs(FACTORS))
    ckpt = load_checkpoint(path)  # through the converted copy's config.json
    assert ckpt.config.rope_scaling == {"rope_type": "freq_factors", "factors": [float(f) for f in FACTORS]}
    assert set(ckpt.weights) == set(hf)  # rope_freqs is no weight
    for name, t in hf.items():
        assert torch.equal(ckpt.weights[name], t), name


def test_linear_scaling_folds_into_the_factors(make_gguf):
    import gguf

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    path, _ = make_gguf(name="rope-freqs-linear.gguf", extra=_with_freqs(FACTORS, linear))
    c = GGUFFile(path).config()
    assert c.rope_scaling["factors"] == [2.0 * float(f) for f in FACTORS]


def test_bad_factors_are_typed_errors(make_gguf):
    import gguf

    path, _ = make_gguf(name="short.gguf", extra=_with_freqs(FACTORS[:-1]))
    with pytest.raises(CorruptModelError, match="rope_freqs.weight holds 7 factors, expected 8") as info:
        GGUFFile(path).config()
    assert "re-download" in info.value.fix
    path, _ = make_gguf(name="zero.gguf", extra=_with_freqs(np.zeros(HEAD_DIM // 2)))
    with pytest.raises(CorruptModelError, match="positive"):
        GGUFFile(path).config()
    yarn = lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0))  # noqa: E731
    path, _ = make_gguf(name="yarn.gguf", extra=_with_freqs(FACTORS, yarn))
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        GGUFFile(path).config()
    with pytest.raises(CorruptModelError, match="3 frequency factors"):
        rope_inv_freq(HEAD_DIM, THETA, {"rope_type": "freq_factors", "factors": [1.0, 2.0, 3.0]})


def _hf_copy(ckpt, dst, rope_scaling):
    """The converted copy of the GGUF with config.json's rope_scaling replaced."""
    shutil.copytree(ckpt.path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_scaling"] = rope_scaling
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_logits_match_hf_llama3_rope_scaling(make_gguf, tmp_path):
    from tierlm import LLM, SamplingParams

    path, _ = make_gguf(name="rope-freqs.gguf", extra=_with_freqs(FACTORS))
    ckpt = load_checkpoint(path)
    prompt = [(7 * i + 3) % TINY["vocab"] for i in range(24)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5)

    def run(model):
        with LLM(str(model), dtype="fp32", device="cpu", kv_cache_memory=16 << 20) as llm:
            out = llm.generate([prompt], sp)[0].outputs[0]
        return out.token_ids, [{lp.token_id: lp.logprob for lp in step} for step in out.logprobs]

    ours_ids, ours = run(path)
    ref_ids, ref = run(_hf_copy(ckpt, tmp_path / "llama3", LLAMA3))
    assert ours_ids == ref_ids
    for a, b in zip(ours, ref):
        assert a.keys() == b.keys()
        for tid in a:
            assert abs(a[tid] - b[tid]) < 1e-4
    _, plain = run(_hf_copy(ckpt, tmp_path / "plain", None))  # sanity: the factors do change the logits
    assert max(abs(a[t] - p.get(t, a[t])) for a, p in zip(ours, plain) for t in a) > 1e-3
