"""FP8 checkpoints in Hugging Face layout (weight in float8_e4m3fn + weight_scale_inv, quantization_config
{"quant_method": "fp8", "weight_block_size": [128, 128]}): written here from the default model the way DeepSeek-V3
and the Qwen3 FP8 releases store them, then loaded: fp32 weights are the exact dequantization, --quantization fp8
runs the stored bytes and scales, and the engine gives the same greedy tokens either way."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.kernels import quant as kq
from tierlm.models.loader import load_checkpoint
from tierlm.models.loader.quantized import load_quantized
from tierlm.quant.weights import dequantize

from helpers.fp8_checkpoint import write_fp8_checkpoint as _write

@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    src = load_checkpoint("default").path
    return src, _write(src, tmp_path_factory.mktemp("fp8") / "model")


def test_weights_are_the_exact_dequantization(fp8_dir):
    _, path = fp8_dir
    ckpt = load_checkpoint(path)
    assert len(ckpt.fp8_stored) == 7 * ckpt.config.num_layers
    name = "model.layers.3.mlp.down_proj.weight"
    stored = ckpt.fp8_stored[name]
    assert stored.codes.dtype == torch.uint8 and stored.block == (128, 128)
    full = stored.scale_inv.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :1536]
    assert torch.equal(ckpt.weights[name], stored.codes.view(torch.float8_e4m3fn).float() * full)
    assert ckpt.weights[name].dtype == torch.float32
    assert not any(n.endswith("_scale_inv") for n in ckpt.weights)


def test_quantization_fp8_runs_them_as_stored(fp8_dir, tmp_path, caplog):
    _, path = fp8_dir
    ckpt = load_checkpoint(path)
    with caplog.at_level(logging.INFO, logger="tierlm.models.loader.quantized"):
        packed = load_quantized(ckpt, "fp8", root=tmp_path)
    assert "210 as stored (FP8 e4m3, 128x128 blocks)" in caplog.text
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.29.mlp.gate_proj.weight"):
        assert torch.equal(dequantize(packed[name]), ckpt.weights[name])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tierlm.models.loader.quantized"):
        load_quantized(ckpt, "fp8_ue8m0", root=tmp_path)  # fp32 scales are not powers of two: rounded again
    assert "210 re-quantized F8_E4M3 -> fp8_ue8m0" in caplog.text and "rounded a second time" in caplog.text


@pytest.mark.skipif(not kq.qmatmul_usable(), reason="native kernels unavailable (no C compiler)")
def test_the_engine_gives_the_same_tokens_on_the_stored_fp8_weights(fp8_dir):
    """--quantization none computes with the fp32 dequantization, --quantization fp8 with the stored bytes and
    scales and fp32 activations: the same numbers up to summation order, so the same greedy tokens."""
    from tierlm import LLM, SamplingParams

    _, path = fp8_dir
    prompts = ["What is the capital of France?", "Write a haiku about memory bandwidth.",
               "List three prime numbers greater than 20.", "Explain why the sky is blue."]
    params = SamplingParams(temperature=0, max_tokens=24)
    outs = []
    for quantization in ("none", "fp8"):
        with LLM(model=str(path), kv_cache_memory=128 << 20, quantization=quantization) as llm:
            ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
            outs.append([o.outputs[0].token_ids for o in llm.generate(ids, params)])
    assert outs[0] == outs[1]


def test_bad_fp8_checkpoints_name_the_problem(fp8_dir, tmp_path):
    src, _ = fp8_dir
    name = "model.layers.2.self_attn.o_proj.weight"
    with pytest.raises(CorruptModelError, match=f"{name} is FP8 but has no {name}_scale_inv"):
        load_checkpoint(_write(src, tmp_path / "noscale", drop_scale=name))
    with pytest.raises(CorruptModelError, match=r"o_proj.weight_scale_inv has shape \[5, 4\].*need \[5, 5\]"):
        load_checkpoint(_write(src, tmp_path / "badscale", bad_scale=name))
    with pytest.raises(CorruptModelError, match="is FP8 but has no quantization_config"):
        load_checkpoint(_write(src, tmp_path / "nocfg", quant_config=None))
    gptq = tmp_path / "gptq"
    shutil.copytree(src, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quantized with 'gptq'.*--quantization"):
        load_checkpoint(gptq)
