"""Helpers for tiny synthetic checkpoints: HF-named random weights and llama.cpp's GGUF naming/permutation."""
from __future__ import annotations

import torch

TINY = dict(vocab=512, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, layers=2)


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF q/k rows (reimplemented from its description)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_weights(arch: str, seed: int = 0, tied: bool = True, head_dim: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = TINY
    d = head_dim or t["head_dim"]
    h, q, kv = t["hidden"], t["heads"] * d, t["kv_heads"] * d

    def r(*shape):
        return torch.randn(*shape, generator=g)

    w = {"model.embed_tokens.weight": r(t["vocab"], h), "model.norm.weight": r(h)}
    if not tied:
        w["lm_head.weight"] = r(t["vocab"], h)
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
                  p + "self_attn.q_proj.weight": r(q, h), p + "self_attn.k_proj.weight": r(kv, h),
                  p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, q),
                  p + "mlp.gate_proj.weight": r(t["inter"], h), p + "mlp.up_proj.weight": r(t["inter"], h),
                  p + "mlp.down_proj.weight": r(h, t["inter"])})
        if arch == "qwen2":
            w.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv),
                      p + "self_attn.v_proj.bias": r(kv)})
        if arch == "qwen3":
            w.update({p + "self_attn.q_norm.weight": r(d), p + "self_attn.k_norm.weight": r(d)})
    return w


_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
            "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
            "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
            "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest]}"


