"""The weight layout of a Llama-family checkpoint: every tensor name (Hugging Face naming) and shape
that a ModelConfig implies, and the check that a loaded weight dict matches it."""
from __future__ import annotations

from tierlm.config import ModelConfig
from tierlm.core.errors import CorruptModelError


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape, in Hugging Face Llama naming (lm_head.weight only when embeddings are not tied)."""
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    e = config.engram
    for i in e.layers if e is not None else ():  # V4-mini: the Engram layer's parameters (its table is apart)
        p = f"model.layers.{i}.engram."
        shapes[p + "w_k.weight"] = (h, e.slots * e.row_dim)
        shapes[p + "w_v.weight"] = (h, e.slots * e.row_dim)
        shapes[p + "norm_h.weight"] = (h,)
        shapes[p + "norm_k.weight"] = (h,)
        if e.conv:
            shapes[p + "conv"] = (h, e.conv_kernel)
    return shapes


def check_weights(weights: dict, config: ModelConfig, where: str, fix: str) -> None:
    """Raise CorruptModelError naming the first missing tensor or shape mismatch; extra names are the
    caller's business (it filters them before)."""
    shapes = expected_weight_shapes(config)
    missing = [n for n in shapes if n not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CorruptModelError(f"{where} is missing tensor {missing[0]}{more}", fix)
    for name, shape in shapes.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CorruptModelError(f"{where}: tensor {name} has shape {list(got)}, the config implies {list(shape)}",
                                    fix)
