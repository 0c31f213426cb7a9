"""Quantized weights of a loaded checkpoint (models/loader/quantized.py): GGUF blocks taken as stored, the rest
quantized, all cached with a checked manifest; bad requests refused with the fix named."""
from __future__ import annotations

import pytest
import torch

import tierlm.models.loader.quantized as quantized
from tierlm.core.errors import InvalidParameterError
from tierlm.models.loader import load_checkpoint
from tierlm.models.loader.quantized import load_quantized, quantized_names
from tierlm.quant.weights import dequantize

pytest.importorskip("gguf")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_taken_as_stored(make_gguf, kind):
    """Every linear of a GGUF written with `kind` blocks comes out of the packed weights with exactly the
    values of the fp32 conversion (which dequantizes the same blocks), q/k rows un-permuted alike; the
    embedding keeps its stored Q8_0."""
    path, _ = make_gguf(linear_type=kind, name=f"tiny-{kind}.gguf")
    ckpt = load_checkpoint(path)
    packed, sources = quantized.build_quantized(ckpt, kind.lower(), None)
    assert set(packed) == set(quantized_names(ckpt.weights))
    for name, pw in packed.items():
        assert torch.equal(dequantize(pw), ckpt.weights[name]), name
        want = "as stored (GGUF Q8_0)" if name == "model.embed_tokens.weight" else f"as stored (GGUF {kind})"
        assert sources[name] == want


def test_other_formats_are_quantized_from_fp32(make_gguf):
    path, _ = make_gguf(linear_type="Q4_1", name="tiny-q41.gguf", quantize_embedding=False)
    ckpt = load_checkpoint(path)
    packed, sources = quantized.build_quantized(ckpt, "int8", None)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert sources[q] == "re-quantized Q4_1 -> int8" and packed[q].group == ckpt.weights[q].shape[1]
    # an fp32 embedding under a 4-bit request gets q8_0 (the logits matrix stays wide)
    packed4, sources4 = quantized.build_quantized(ckpt, "int4", 64)
    assert sources4["model.embed_tokens.weight"] == "quantized from F32 to q8_0"
    err = (dequantize(packed4[q]) - ckpt.weights[q]).abs().max()
    assert 0 < err < 0.5 * ckpt.weights[q].abs().max()
    # Q4_1's values re-quantized by the same rule in groups of 32 come back unchanged
    packed32, _ = quantized.build_quantized(ckpt, "int4", 32)
    assert torch.equal(dequantize(packed32[q]), ckpt.weights[q])


def test_cached_once_and_a_corrupt_file_is_rebuilt(make_gguf, monkeypatch, caplog):
    path, _ = make_gguf(linear_type="Q4_1", name="tiny-cache.gguf")
    ckpt = load_checkpoint(path)
    calls = []
    real = quantized.build_quantized
    monkeypatch.setattr(quantized, "build_quantized", lambda *a: calls.append(a) or real(*a))
    first = load_quantized(ckpt, "q4_1")
    again = load_quantized(ckpt, "q4_1")
    assert len(calls) == 1, "the second load reads the cache"
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(again[name].data, first[name].data)
    entry = quantized._entry(ckpt, "q4_1", None, None)
    f = entry / quantized.FILE
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x40  # one flipped bit in the tensor data
    f.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        rebuilt = load_quantized(ckpt, "q4_1")
    assert len(calls) == 2 and "rebuilding" in caplog.text
    for n in first:
        assert torch.equal(rebuilt[n].data, first[n].data) and torch.equal(rebuilt[n].scales, first[n].scales)


def test_a_group_the_shapes_cannot_take_is_refused_before_any_work(make_gguf, monkeypatch):
    path, _ = make_gguf(name="tiny-g.gguf")  # hidden 64, intermediate 128
    ckpt = load_checkpoint(path)
    monkeypatch.setattr(quantized, "build_quantized", lambda *a: pytest.fail("built despite a bad group"))
    with pytest.raises(InvalidParameterError, match=r"\[.*64\] has 64 inputs, not a multiple of the int4 group 128"):
        load_quantized(ckpt, "int4", 128)


def test_each_tensors_path_is_reported(make_gguf, caplog):
    """A GGUF type with no kernel (Q5_0) is dequantized and rounded again on request: the load says so, with a
    count per path; F32 tensors are 'quantized from F32'."""
    path, _ = make_gguf(linear_type="Q5_0", name="tiny-q50.gguf")
    ckpt = load_checkpoint(path)
    with caplog.at_level("INFO"):
        load_quantized(ckpt, "q4_1")
    assert "14 re-quantized Q5_0 -> q4_1, 1 as stored (GGUF Q8_0)" in caplog.text
    assert "rounded a second time" in caplog.text
    path32, _ = make_gguf(name="tiny-f32.gguf", quantize_embedding=False)
    packed, sources = quantized.build_quantized(load_checkpoint(path32), "q8_0", None)
    assert set(sources.values()) == {"quantized from F32 to q8_0"}


def test_quantization_gguf_runs_each_tensor_as_its_gguf_stores_it(make_gguf, caplog):
    """--quantization gguf: Q5_0 linears and the Q8_0 embedding as stored (exactly the fp32 path's numbers), the
    F32 ones as q8_0; info lists the mode; a model that is not a GGUF is refused with the fix."""
    path, _ = make_gguf(linear_type="Q5_0", name="tiny-q50.gguf")
    ckpt = load_checkpoint(path)
    with caplog.at_level("INFO"):
        packed = load_quantized(ckpt, "gguf")
    assert "14 as stored (GGUF Q5_0), 1 as stored (GGUF Q8_0)" in caplog.text
    assert "rounded a second time" not in caplog.text
    for name, pw in packed.items():
        assert torch.equal(dequantize(pw), ckpt.weights[name]), name
    rows = {r["format"]: r for r in quantized.weight_bytes_by_format(ckpt)}
    assert rows["gguf"]["as_stored"] and rows["gguf"]["linears"] == rows["q8_0"]["linears"]
    path32, _ = make_gguf(name="tiny-f32.gguf", quantize_embedding=False)
    _, sources = quantized.build_quantized(load_checkpoint(path32), "gguf", None)
    assert set(sources.values()) == {"quantized from F32 to q8_0"}
    hf = load_checkpoint(path32).path  # the converted Hugging Face directory: no GGUF blocks to run
    with pytest.raises(InvalidParameterError, match="--quantization gguf runs a GGUF's own blocks.*not a GGUF"):
        load_quantized(load_checkpoint(hf), "gguf")


@pytest.mark.parametrize("tied", [True, False])
def test_the_bench_counts_what_a_quantized_step_reads(make_gguf, tied):
    """weight_bytes: a quantized embedding table is only gathered (not read per step) unless it is also the
    tied LM head; every packed byte is resident."""
    import torch

    from tierlm.bench.memory import weight_bytes
    from tierlm.models import build_model

    path, _ = make_gguf(linear_type="Q4_1", name=f"tiny-bytes-{tied}.gguf", tied=tied)
    ckpt = load_checkpoint(path)
    packed = load_quantized(ckpt, "q4_1")
    model = build_model(ckpt.config, ckpt.weights, torch.float32, "cpu", None, packed)
    resident, read = weight_bytes(model)
    table = packed["model.embed_tokens.weight"].nbytes
    rope = sum(b.numel() * b.element_size() for b in model.rope.buffers())  # the RoPE tables count too
    assert resident == sum(p.nbytes for p in packed.values()) + rope + sum(
        t.numel() * 4 for n, t in ckpt.weights.items() if n.endswith("norm.weight"))
    assert resident - read == (0 if tied else table)
