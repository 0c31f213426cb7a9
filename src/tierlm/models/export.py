"""Writing a model as a checkpoint directory every tierlm command loads (the inverse of load_weights):
config.json, model.safetensors in Hugging Face names (fused q/k/v and gate/up split back), tokenizer files, and
for a V4-mini its Engram tables (engram.safetensors) and token map (engram_map.json).

    save_checkpoint(model, tokenizer, out_dir, token_map=None, source="tierlm-train")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tierlm.models.loader.config_json import model_config_to_hf
from tierlm.models.loader.tokenizer import Tokenizer


def export_weights(model) -> dict[str, torch.Tensor]:
    """The model's dense parameters in Hugging Face Llama names (plus a V4-mini's Engram layer parameters)."""
    c = model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight,
                                    "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p, a = f"model.layers.{i}.", layer.self_attn
        for name, part in zip("qkv", a.qkv_proj.weight.split((q, kv, kv))):
            out[p + f"self_attn.{name}_proj.weight"] = part
        if a.qkv_proj.bias is not None:
            for name, part in zip("qkv", a.qkv_proj.bias.split((q, kv, kv))):
                out[p + f"self_attn.{name}_proj.bias"] = part
        out[p + "self_attn.o_proj.weight"] = a.o_proj.weight
        if a.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = a.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = a.k_norm.weight
        gate, up = layer.mlp.gate_up_proj.weight.split(c.intermediate_size)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    if hasattr(model, "export_extra"):
        out.update(model.export_extra()[0])
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def save_checkpoint(model, tokenizer: Tokenizer, out_dir: str | Path, token_map: torch.Tensor | None = None,
                    **info) -> Path:
    """Write `model` (and its tokenizer) into `out_dir` (created); `info` goes into config.json's tierlm block."""
    from tierlm.memory.hashing import save_map

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    (out / "config.json").write_text(json.dumps(model_config_to_hf(c, **info), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids)}) + "\n")
    tokenizer.save(out, model_max_length=c.max_position_embeddings)
    save_tensors(export_weights(model), out / "model.safetensors")
    if hasattr(model, "export_extra"):
        save_tensors(model.export_extra()[1], out / "engram.safetensors")
        if c.engram.num_ids:
            save_map(out / "engram_map.json", token_map if token_map is not None else model.token_map.cpu())
    return out
