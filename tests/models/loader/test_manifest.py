"""Cache-entry manifests (bit rot in a cached model is caught and the entry rebuilt) and LoadedCheckpoint's
weights_digest (a content digest of the weights: same bytes, same digest; one changed value, another)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tracemalloc

import pytest
import torch
import xxhash

from tierlm.models.loader import load_checkpoint, manifest
from tierlm.models.loader.gguf_conversion import convert_gguf
from tierlm.models.loader.hf import read_safetensors
from tierlm.models.loader.manifest import MANIFEST_FILE, hash_file, weights_digest

ENTRY_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json"}




def _data_start(path) -> int:
    """Offset of the first tensor byte of a .safetensors file (8-byte header length, JSON header, data)."""
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def _flip_middle(path, nbytes=16):
    """XOR bytes in the middle of the tensor data; the header, size and mtime-independent layout stay."""
    start, size = _data_start(path), path.stat().st_size
    mid = (start + size) // 2
    with open(path, "r+b") as fh:
        fh.seek(mid)
        chunk = bytearray(fh.read(nbytes))
        fh.seek(mid)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    return mid


def _tree_mtimes(entry):
    return {p.name: p.stat().st_mtime_ns for p in [entry, *entry.iterdir()]}


def test_entry_has_a_manifest_of_every_file(make_gguf, own_cache):
    path, _ = make_gguf()
    entry = load_checkpoint(path).path
    data = json.loads((entry / MANIFEST_FILE).read_text())
    assert data["version"] == 1 and data["hash"] == "xxh3_128"
    assert set(data["files"]) == ENTRY_FILES
    for name, rec in data["files"].items():
        raw = (entry / name).read_bytes()
        assert rec == {"size": len(raw), "xxh3_128": xxhash.xxh3_128(raw).hexdigest()}, name


def test_bit_rot_in_tensor_data_is_rebuilt(make_gguf, own_cache, counted, tmp_path, caplog):
    path, hf = make_gguf()
    entry = load_checkpoint(path).path
    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    offset = _flip_middle(weights)
    assert offset > _data_start(weights) + 1000 and weights.stat().st_size == size  # data, not header
    with caplog.at_level(logging.WARNING, logger="tierlm.models.loader"):
        ckpt = load_checkpoint(path)
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    convert_gguf(path, fresh_dir)
    fresh = read_safetensors(fresh_dir / "model.safetensors")
    assert set(fresh) >= set(ckpt.weights)
    for name, t in ckpt.weights.items():
        assert torch.equal(t, fresh[name]), name
        assert torch.equal(t, hf[name]), name
    assert len(counted) == 2 and ckpt.path == entry
    assert "model.safetensors" in caplog.text and "rebuilding" in caplog.text
    # Conversion is deterministic: the rebuilt file is byte-identical to a fresh conversion, digest included.
    assert ckpt.weights_digest == hash_file(fresh_dir / "model.safetensors")[1]


@pytest.mark.parametrize("damage", ["truncate_weights_tail", "append_to_weights", "missing_generation_config",
                                    "truncate_tokenizer_config", "edit_config", "missing_manifest",
                                    "garbage_manifest", "manifest_lists_missing_file"])
def test_damaged_entry_is_rebuilt(make_gguf, own_cache, counted, damage, caplog):
    path, hf = make_gguf()
    entry = load_checkpoint(path).path
    weights = entry / "model.safetensors"
    named = "model.safetensors"
    if damage == "truncate_weights_tail":
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size - 4)
    elif damage == "append_to_weights":
        with open(weights, "ab") as fh:
            fh.write(b"\0" * 8)
    elif damage == "missing_generation_config":
        (entry / "generation_config.json").unlink()
        named = "generation_config.json"
    elif damage == "truncate_tokenizer_config":
        p = entry / "tokenizer_config.json"
        p.write_bytes(p.read_bytes()[:-10])
        named = "tokenizer_config.json"
    elif damage == "edit_config":  # same size, one digit changed: only the digest sees it
        p = entry / "config.json"
        text = p.read_text()
        p.write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
        assert p.read_text() != text
        named = "config.json"
    elif damage == "missing_manifest":
        (entry / MANIFEST_FILE).unlink()
        named = MANIFEST_FILE
    elif damage == "garbage_manifest":
        (entry / MANIFEST_FILE).write_text("{not json")
        named = MANIFEST_FILE
    else:
        data = json.loads((entry / MANIFEST_FILE).read_text())
        data["files"]["extra.bin"] = {"size": 1, "xxh3_128": "0" * 32}
        (entry / MANIFEST_FILE).write_text(json.dumps(data))
        named = "extra.bin"
    with caplog.at_level(logging.WARNING, logger="tierlm.models.loader"):
        ckpt = load_checkpoint(path)
    assert len(counted) == 2 and ckpt.path == entry
    assert named in caplog.text and "rebuilding" in caplog.text
    for name, t in hf.items():
        assert torch.equal(ckpt.weights[name], t), name
    assert {p.name for p in entry.iterdir()} == ENTRY_FILES | {MANIFEST_FILE}
    assert sorted(p.name for p in (own_cache / "models").iterdir()) == [entry.name]
    assert load_checkpoint(path).path == entry and len(counted) == 2  # and now it is good again


def test_untouched_entry_is_not_rebuilt(make_gguf, own_cache, counted, caplog):
    path, _ = make_gguf()
    entry = load_checkpoint(path).path
    before = _tree_mtimes(entry)
    with caplog.at_level(logging.WARNING, logger="tierlm.models.loader"):
        for _ in range(2):
            ckpt = load_checkpoint(path)
    assert len(counted) == 1 and ckpt.path == entry and ckpt.source == "gguf-cache"
    assert _tree_mtimes(entry) == before
    assert caplog.text == ""


def test_weights_digest(make_gguf, own_cache, tmp_path):
    path, _ = make_gguf()
    a = load_checkpoint(path)
    b = load_checkpoint(path)
    assert a.weights_digest == b.weights_digest
    assert len(a.weights_digest) == 32 and int(a.weights_digest, 16) >= 0
    assert a.weights_digest == xxhash.xxh3_128((a.path / "model.safetensors").read_bytes()).hexdigest()

    # The same files as a user's Hugging Face directory (no manifest, other path, other mtimes).
    copy = tmp_path / "copy-of-entry"
    shutil.copytree(a.path, copy)
    (copy / MANIFEST_FILE).unlink()
    os.utime(copy / "model.safetensors", ns=(1, 1))
    as_hf = load_checkpoint(copy)
    assert as_hf.source == "hf" and as_hf.weights_digest == a.weights_digest

    # One weight value changed: another digest (and the HF directory, unverified, still loads).
    tensors = {k: v.clone() for k, v in read_safetensors(copy / "model.safetensors").items()}
    tensors["model.norm.weight"][3] += 1.0
    from safetensors.torch import save_file
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    changed = load_checkpoint(copy)
    assert changed.weights_digest != a.weights_digest
    assert changed.weights["model.norm.weight"][3] == tensors["model.norm.weight"][3]


def test_weights_digest_of_sharded_files(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    parts = {f"model-0000{i}-of-00002.safetensors": {f"w{i}": torch.randn(8, 8, generator=g)} for i in (1, 2)}
    for name, tensors in parts.items():
        save_file(tensors, str(tmp_path / name))
    files = [tmp_path / n for n in parts]
    digest = weights_digest(files)
    assert digest == weights_digest(reversed(files))  # order of discovery does not matter: sorted by name
    singles = [hash_file(f)[1] for f in files]
    assert digest not in singles and len(digest) == 32
    assert weights_digest(files, known={files[0].name: singles[0]}) == digest
    swapped = [tmp_path / "swapped" / n for n in parts]
    swapped[0].parent.mkdir()
    shutil.copy(files[0], swapped[1])
    shutil.copy(files[1], swapped[0])
    assert weights_digest(swapped) != digest  # which shard holds what is part of the content


def test_hash_file_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CHUNK_BYTES", 1 << 20)
    f = tmp_path / "blob"
    data = os.urandom((24 << 20) + 12345)  # 24+ chunks, last one partial
    f.write_bytes(data)
    want = xxhash.xxh3_128(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        size, digest = hash_file(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (size, digest) == ((24 << 20) + 12345, want)
    assert peak < 3 << 20, f"hashing a 24 MiB file peaked at {peak} bytes"
