"""GGUF conversion: a GGUF file written out as a Hugging Face model directory (fp32 model.safetensors,
config.json, generation_config.json, tokenizer.json, tokenizer_config.json with the chat template), so
later loads need neither the GGUF nor any dequantization."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from tierlm.models.loader.config_json import model_config_to_hf
from tierlm.models.loader.gguf import GGUFFile

log = logging.getLogger(__name__)
CONVERTER_VERSION = 1  # bump when the converted layout changes: old cache entries are then rebuilt
# (Entries written before cache manifests existed are not told apart by a bump: ModelCache.verify treats
# their missing tierlm-manifest.json as damage, so each is rebuilt once, in place, leaving no orphan.)


def write_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out_dir: Path, model_id: str | None = None) -> None:
    """Write the Hugging Face layout of `gguf_path` into the existing, empty `out_dir`."""
    start = time.perf_counter()
    gguf = GGUFFile(gguf_path)
    config = gguf.config(model_id)
    tokenizer = gguf.tokenizer()  # before the weights: a bad tokenizer fails fast
    weights = gguf.weights(config)
    gguf.close()
    info = {"source": "gguf", "source_file": Path(gguf_path).name, "converter_version": CONVERTER_VERSION,
            "gguf_name": gguf.metadata.get("general.name")}
    _write_json(out_dir / "config.json", model_config_to_hf(config, **info))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    _write_json(out_dir / "generation_config.json", gen)
    tokenizer.save(out_dir, model_max_length=config.max_position_embeddings)
    write_weights(weights, out_dir / "model.safetensors")
    log.info("converted %s to %s in %.1fs", gguf_path, out_dir, time.perf_counter() - start)
