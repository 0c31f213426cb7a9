"""The converted-model cache: convert once, reuse, rebuild what is corrupt, never leave a partial entry."""
from __future__ import annotations

import os
import time

import pytest
import torch

from tierlm.models.loader import gguf_conversion, load_checkpoint
from tierlm.models.loader.cache import ModelCache, cache_root


def _entries(root):
    models = root / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []




def test_cache_root_follows_env(own_cache):
    assert cache_root() == own_cache
    assert ModelCache().root == own_cache / "models"


def test_default_model_second_load_is_cached(default_ckpt, counted):
    weights_file = default_ckpt.path / "model.safetensors"
    mtime = weights_file.stat().st_mtime_ns
    start = time.perf_counter()
    again = load_checkpoint("default")
    elapsed = time.perf_counter() - start
    assert counted == [] and again.source == "gguf-cache" and again.path == default_ckpt.path
    assert weights_file.stat().st_mtime_ns == mtime
    assert elapsed < 5.0, f"cached load took {elapsed:.1f}s"  # includes re-hashing the 540 MB manifest-listed files
    assert again.weights_digest == default_ckpt.weights_digest and len(again.weights_digest) == 32
    assert torch.equal(again.weights["model.layers.3.self_attn.k_proj.weight"],
                       default_ckpt.weights["model.layers.3.self_attn.k_proj.weight"])
    print(f"\ndefault model: first conversion {default_ckpt.conversion_seconds:.1f}s, cached load {elapsed:.2f}s")


def test_tiny_converted_once(make_gguf, own_cache, counted):
    path, _ = make_gguf()
    first = load_checkpoint(path)
    second = load_checkpoint(str(path))
    assert len(counted) == 1 and first.path == second.path
    assert _entries(own_cache) == [first.path.name]
    assert first.path.name.startswith("tiny-")
    assert {p.name for p in first.path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json",
                                                      "tierlm-manifest.json"}


def test_changed_gguf_gets_a_new_entry(make_gguf, own_cache, counted):
    path, _ = make_gguf(seed=1)
    load_checkpoint(path)
    path, hf = make_gguf(seed=2)  # same name, new content
    ckpt = load_checkpoint(path)
    assert len(counted) == 2
    assert torch.equal(ckpt.weights["model.norm.weight"], hf["model.norm.weight"])


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_weights", "bad_config", "bad_tokenizer",
                                    "missing_weights"])
def test_corrupt_entry_is_rebuilt(make_gguf, own_cache, counted, damage):
    path, hf = make_gguf()
    entry = load_checkpoint(path).path
    weights = entry / "model.safetensors"
    if damage == "truncate_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_weights":
        weights.write_bytes(os.urandom(4096))
    elif damage == "bad_config":
        (entry / "config.json").write_text("{not json")
    elif damage == "bad_tokenizer":
        (entry / "tokenizer.json").write_text('{"version": "1.0", "model": 17}')
    else:
        weights.unlink()
    ckpt = load_checkpoint(path)
    assert len(counted) == 2 and ckpt.path == entry
    for name, t in hf.items():
        assert torch.equal(ckpt.weights[name], t), name
    assert _entries(own_cache) == [entry.name]


def test_crash_during_conversion_leaves_nothing(make_gguf, own_cache, monkeypatch):
    path, _ = make_gguf()
    real = gguf_conversion.write_weights

    def crash(weights, out):
        real(dict(list(weights.items())[:3]), out)  # half-written file, then the process "dies"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_conversion, "write_weights", crash)
    with pytest.raises(OSError, match="No space left"):
        load_checkpoint(path)
    assert _entries(own_cache) == []  # no entry, no temp dir
    monkeypatch.setattr(gguf_conversion, "write_weights", real)
    assert load_checkpoint(path).source == "gguf-cache"


def test_keyboard_interrupt_during_conversion_leaves_nothing(make_gguf, own_cache, monkeypatch):
    path, _ = make_gguf()

    def interrupt(weights, out):
        out.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_conversion, "write_weights", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(path)
    assert _entries(own_cache) == []


def test_stale_temp_dir_of_dead_process_is_swept(make_gguf, own_cache):
    path, _ = make_gguf()
    entry = ModelCache().entry_for(path, salt=f"v{gguf_conversion.CONVERTER_VERSION}")
    stale = entry.parent / f".{entry.name}.tmp-999999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"junk")
    load_checkpoint(path)
    assert _entries(own_cache) == [entry.name]


def test_concurrent_builder_wins(tmp_path):
    cache = ModelCache(tmp_path)
    entry = tmp_path / "m-abc"

    def write(tmp):  # while we write, "another process" finishes the same entry
        (tmp / "x").write_text("ours")
        entry.mkdir()
        (entry / "x").write_text("theirs")

    assert cache.build(entry, write) == entry
    assert (entry / "x").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["m-abc"]
