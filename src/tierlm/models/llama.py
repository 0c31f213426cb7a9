"""The Llama family (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k norm) over a paged KV cache.

Weights arrive in Hugging Face names; `load_weights` fuses q/k/v and gate/up into single matmuls.
The forward pass takes the step's flattened tokens and explicit attention metadata.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.attention import AttentionContext
from tierlm.attention.cpu_backend import CpuBackend
from tierlm.config import ModelConfig
from tierlm.core.errors import CorruptModelError
from tierlm.models.layers import RMSNorm, RotaryEmbedding, apply_rope
from tierlm.models.linear import quant_mlp


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, self.hq + 2 * self.hkv, self.d)  # [T, Hq + 2 Hkv, D]
        v = qkv[:, self.hq + self.hkv:]
        if self.q_norm is None:
            # q and k are adjacent: rotate them in one pass.
            qk = apply_rope(qkv[:, : self.hq + self.hkv], *rope)
            q, k = qk[:, : self.hq], qk[:, self.hq:]
        else:
            q = apply_rope(self.q_norm(qkv[:, : self.hq]), *rope)
            k = apply_rope(self.k_norm(qkv[:, self.hq: self.hq + self.hkv]), *rope)
        o = ctx.forward(self.layer_idx, q, k, v, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = quant_mlp(self.gate_up_proj, self.down_proj, x)  # quantized weights, decode: one native call
        if fused is not None:
            return fused
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, attention: type = Attention):
        super().__init__()
        self.self_attn = attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, rope, ctx: AttentionContext):
        """Pre-norm block with the residual stream carried beside the branch output (the adds are fused
        into the norms): returns (this block's MLP output, the residual stream before adding it)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    attention_class: type = Attention  # the attention every layer runs (V4-mini picks one by config)

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attention = self.attention_for(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attention) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_positions = max_positions or cfg.max_position_embeddings

    @classmethod
    def attention_for(cls, cfg: ModelConfig) -> type:
        return cls.attention_class

    def init_rope(self, device: torch.device | str) -> None:
        """RoPE tables are derived, not loaded: build them after the weights are in place."""
        c = self.config
        self.rope = RotaryEmbedding(c.head_dim, self.max_positions, c.rope_theta, c.rope_scaling).to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (final norm applied)."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions)
        native = self._native_decode(x, rope, ctx)
        if native is not None:
            return self.norm(*native)[0]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        return self.norm(x, residual)[0]

    # ---- the native decode step ----------------------------------------------------------------------
    def _native_decode(self, x: torch.Tensor, rope, ctx: AttentionContext):
        """(last MLP output, residual) from kernels/quant.py DecodeStack when this step can take it: quantized
        linears on the CPU, no q/k norm, fp32 KV read by the cpu backend, dense attention, no spill, every row
        a decode; else None (the layers run one by one). TIERLM_NATIVE_DECODE=0 turns it off."""
        if not isinstance(ctx, AttentionContext):  # models/dense.py: training or the reference pass
            return None
        meta = ctx.meta
        if meta.num_decodes != x.shape[0] or ctx.selector is not None or ctx.kv.spill is not None \
                or x.dtype is not torch.float32 or x.device.type != "cpu" \
                or os.environ.get("TIERLM_NATIVE_DECODE", "1") == "0":
            return None
        stack = self._decode_stack()
        if stack is None or x.shape[0] >= stack.max_rows or not isinstance(ctx.backend, CpuBackend):
            return None
        layers = [ctx.kv[i] for i in range(len(self.layers))]
        if any(kv.scheme is not None for kv in layers):
            return None
        cos, sin = (t.squeeze(1).contiguous() for t in rope)
        return stack.run(x, cos, sin, [kv.data for kv in layers], meta.slot_mapping.contiguous(),
                         meta.decode_block_tables.contiguous(), meta.decode_seq_lens.contiguous())

    def _decode_stack(self):
        """The bound DecodeStack, rebuilt when a linear's kernel arguments changed (a new activation mode, a move);
        None when the model cannot take the native step."""
        from tierlm.models.linear import QuantLinear

        cached = self.__dict__.get("_native_stack")
        mods = [(L.self_attn.qkv_proj, L.self_attn.o_proj, L.mlp.gate_up_proj, L.mlp.down_proj) for L in self.layers]
        if cached is not None and all(m.__dict__.get("_plan") is p for ms, ps in zip(mods, cached[1])
                                      for m, p in zip(ms, ps)):
            return cached[0]
        self.__dict__.pop("_native_stack", None)
        if self.config.qk_norm or not all(
                isinstance(m, QuantLinear) for ms in mods for m in ms):
            return None
        from tierlm.kernels import cpu as cpu_kernels
        from tierlm.kernels import quant as qk

        plans = [tuple(m.plan() for m in ms) for ms in mods]
        norms = [(L.input_layernorm.weight, L.post_attention_layernorm.weight) for L in self.layers]
        if any(p is None for ps in plans for p in ps) or not cpu_kernels.usable(*(w for n in norms for w in n)):
            return None
        a = self.layers[0].self_attn
        stack = qk.DecodeStack([(*ps, *(w.contiguous() for w in n)) for ps, n in zip(plans, norms)],
                               self.config.hidden_size, a.hq, a.hkv, a.d, self.layers[0].input_layernorm.eps, a.scale)
        self.__dict__["_native_stack"] = (stack, plans)
        return stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        if self.lm_head is None:  # tied embeddings (a quantized model always has an lm_head module)
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    # ---- weights -------------------------------------------------------------------------------
    def _load_extra(self, take, put) -> None:
        """A subclass's own tensors (V4-mini: Engram), with load_weights' `take(name)` and `put(path, tensor)`."""

    def load_weights(self, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str,
                     packed: dict | None = None) -> None:
        """Assign Hugging Face-named tensors (fusing q/k/v and gate/up) into a module built on `meta`. With
        `packed` ({name: quant.weights.PackedWeight}), the linears and the embedding it holds become
        QuantLinear / QuantEmbedding modules (fused the same way) and their fp32 tensors are not read."""
        c = self.config
        used: set[str] = set()
        packed = packed or {}

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise CorruptModelError(f"checkpoint is missing tensor {name!r}",
                                        "re-download or re-convert the model; the file is incomplete")
            used.add(name)
            return weights[name]

        def put(param_path: str, *tensors: torch.Tensor) -> None:
            t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            module_path, _, attr = param_path.rpartition(".")
            module = self.get_submodule(module_path)
            expected = getattr(module, attr).shape
            if tuple(t.shape) != tuple(expected):
                raise CorruptModelError(f"tensor {param_path} has shape {tuple(t.shape)}, expected {tuple(expected)}",
                                        "the weights do not match config.json; check the checkpoint")
            setattr(module, attr, nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=False))

        def linear(param_path: str, *names: str, bias: tuple[str, ...] = ()) -> None:
            """A (fused) linear: packed when every part is, else fp32 weights (and bias) as usual."""
            if names and all(n in packed for n in names):
                from tierlm.models.linear import QuantLinear
                from tierlm.quant.weights import concat_rows

                used.update(names)
                pw = concat_rows([packed[n] for n in names]) if len(names) > 1 else packed[names[0]]
                b = torch.cat([take(n) for n in bias]).to(device=device, dtype=torch.float32) if bias else None
                module_path = param_path.rpartition(".")[0]
                parent, _, child = module_path.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, child, QuantLinear(pw.to(device), b))
                return
            put(param_path, *(take(n) for n in names))
            if bias:
                put(param_path.rpartition(".")[0] + ".bias", *(take(n) for n in bias))

        if "model.embed_tokens.weight" in packed:
            from tierlm.models.linear import QuantEmbedding

            from tierlm.models.linear import QuantLinear

            used.add("model.embed_tokens.weight")
            table = QuantLinear(packed["model.embed_tokens.weight"].to(device))
            self.embed_tokens = QuantEmbedding(table, dtype)
            if self.lm_head is None:  # tied: the same packed table computes the logits
                self.lm_head = table
        else:
            put("embed_tokens.weight", take("model.embed_tokens.weight"))
        put("norm.weight", take("model.norm.weight"))
        if not c.tie_word_embeddings:
            linear("lm_head.weight", "lm_head.weight")
        for i in range(c.num_layers):
            p, a = f"model.layers.{i}.", f"layers.{i}.self_attn."
            linear(a + "qkv_proj.weight", *(p + f"self_attn.{n}_proj.weight" for n in "qkv"),
                   bias=tuple(p + f"self_attn.{n}_proj.bias" for n in "qkv") if c.attention_bias else ())
            linear(a + "o_proj.weight", p + "self_attn.o_proj.weight")
            if c.qk_norm:
                put(a + "q_norm.weight", take(p + "self_attn.q_norm.weight"))
                put(a + "k_norm.weight", take(p + "self_attn.k_norm.weight"))
            m = f"layers.{i}.mlp."
            linear(m + "gate_up_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            linear(m + "down_proj.weight", p + "mlp.down_proj.weight")
            put(f"layers.{i}.input_layernorm.weight", take(p + "input_layernorm.weight"))
            put(f"layers.{i}.post_attention_layernorm.weight", take(p + "post_attention_layernorm.weight"))
        self._load_extra(take, put)
        meta_left = [n for n, t in self.named_parameters() if t.is_meta]
        if meta_left:
            raise CorruptModelError(f"parameters left unloaded: {meta_left[:3]}", "the checkpoint is incomplete")
        self.init_rope(device)
