"""GGUFFile: one llama.cpp GGUF file read as a ModelConfig, fp32 weights in Hugging Face names, and a
Tokenizer.

Facts about the format (from llama.cpp's converter and gguf-py):
- tensor shapes are stored innermost-first (ne[0] is the input dim), so a weight with ne [in, out] is an
  (out, in) matrix in PyTorch order;
- for the 'llama' architecture the converter permutes the rows of attn_q / attn_k inside each head so
  llama.cpp can rotate adjacent pairs; we undo that here so GGUF and Hugging Face weights share one
  ("rotate_half") RoPE. qwen2 / qwen3 GGUFs are stored unpermuted (NEOX-style RoPE);
- Llama 3.1/3.2 GGUFs carry their llama3 RoPE scaling as a tensor, rope_freqs.weight (one divisor per
  frequency: inv_freq / rope_freqs), not as metadata; it becomes rope_scaling {"rope_type": "freq_factors"}.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tierlm.config import ModelConfig
from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.core.registry import get_architecture, gguf_architecture_names
from tierlm.models.loader.tokenizer import Tokenizer
from tierlm.models.loader.weight_layout import check_weights

GGUF_ARCHITECTURES = gguf_architecture_names()  # from the one registry (tierlm.core.registry)
_REFETCH = "re-download or re-convert the GGUF file"
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3.1/3.2 GGUFs)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None when it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows were reordered from
    [first half | second half] to interleaved pairs; this puts them back (works for weights and biases)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _nice_float(value: Any) -> float:
    """float32 metadata (1e-5 stored as 9.99999974e-06) back to the decimal it was written from."""
    return float(f"{float(value):.7g}")


class GGUFFile:
    """An open GGUF file. Construction parses the header and raises a typed error on a bad file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise CorruptModelError(f"cannot read {self.path}: {exc.strerror}", "check the file's permissions") from exc
        if magic != b"GGUF":
            raise CorruptModelError(f"{self.path} is not a GGUF file (magic {magic!r}, expected b'GGUF')",
                                    "pass a .gguf file from llama.cpp's converter, or re-download it")
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(str(self.path), "r")
        except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on bad bytes
            raise CorruptModelError(f"{self.path} is truncated or corrupt: {_first_line(exc)}",
                                    _REFETCH) from exc
        self._meta: dict[str, Any] = {}
        try:
            for key, fld in self._reader.fields.items():
                if not key.startswith("GGUF."):
                    self._meta[key] = fld.contents()
        except Exception as exc:
            raise CorruptModelError(f"{self.path} has unreadable metadata: {_first_line(exc)}", _REFETCH) from exc
        self.architecture = str(self._meta.get("general.architecture", ""))

    @property
    def metadata(self) -> dict[str, Any]:
        return self._meta

    def _arch_value(self, key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{self.architecture}.{key}"
        value = self._meta.get(full, default)
        if value is None and required:
            raise CorruptModelError(f"{self.path} lacks the metadata key {full}", _REFETCH)
        if isinstance(value, list):
            raise UnsupportedModelError(f"{self.path}: per-layer {full} is not supported",
                                        "use a model with the same value for every layer")
        return value

    # ----------------------------------------------------------------- config
    def config(self, model_id: str | None = None) -> ModelConfig:
        arch = self.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported",
                                        f"use a {', '.join(GGUF_ARCHITECTURES)} model")
        names = {t.name for t in self._reader.tensors}
        hidden = int(self._arch_value("embedding_length", required=True))
        heads = int(self._arch_value("attention.head_count", required=True))
        kv_heads = int(self._arch_value("attention.head_count_kv", heads))
        head_dim = int(self._arch_value("attention.key_length", hidden // heads))
        value_dim = int(self._arch_value("attention.value_length", head_dim))
        rot_dim = int(self._arch_value("rope.dimension_count", head_dim))
        if value_dim != head_dim or rot_dim != head_dim:
            raise UnsupportedModelError(
                f"{self.path}: key/value/rotary dims {head_dim}/{value_dim}/{rot_dim} differ",
                "tierlm supports models whose key, value and rotary dims are all head_dim")
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise CorruptModelError(f"{self.path}: {heads} heads is not a multiple of {kv_heads} KV heads", _REFETCH)
        tokens = self._meta.get("tokenizer.ggml.tokens")
        vocab = self._arch_value("vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            embd = next((t for t in self._reader.tensors if t.name == "token_embd.weight"), None)
            vocab = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else 0
        rope_scaling = None
        scaling_type = self._arch_value("rope.scaling.type")
        if scaling_type not in (None, "none"):
            rope_scaling = {"rope_type": str(scaling_type), "factor": _nice_float(self._arch_value("rope.scaling.factor", 1.0))}
            orig = self._arch_value("rope.scaling.original_context_length")
            if orig:
                rope_scaling["original_max_position_embeddings"] = int(orig)
        if ROPE_FREQS in names:
            rope_scaling = self._freq_factors(head_dim, rope_scaling)
        window = self._arch_value("attention.sliding_window")
        bos = self._meta.get("tokenizer.ggml.bos_token_id")
        eos_ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if self._meta.get(key) is not None and int(self._meta[key]) not in eos_ids:
                eos_ids.append(int(self._meta[key]))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._arch_value("feed_forward_length", required=True)),
            num_layers=int(self._arch_value("block_count", required=True)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(self._arch_value("context_length", 2048)),
            rope_theta=_nice_float(self._arch_value("rope.freq_base", 10000.0)),
            rms_norm_eps=_nice_float(self._arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            rope_scaling=rope_scaling,
            sliding_window=int(window) if window else None,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=tuple(eos_ids),
            model_id=model_id or self.path.stem.replace(".", "-"),
        )

    def _freq_factors(self, head_dim: int, rope_scaling: dict | None) -> dict:
        """rope_scaling for a GGUF with rope_freqs.weight (llama.cpp's per-frequency divisors, written for Llama
        3.1/3.2): {"rope_type": "freq_factors", "factors": [head_dim / 2 floats]}; linear scaling folds in."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = next(t for t in self._reader.tensors if t.name == ROPE_FREQS)
        try:
            factors = np.asarray(dequantize(t.data, GGMLQuantizationType(int(t.tensor_type))), dtype=np.float64)
        except (NotImplementedError, ValueError) as exc:
            raise CorruptModelError(f"{self.path}: {ROPE_FREQS} is unreadable: {_first_line(exc)}", _REFETCH) from exc
        factors = factors.reshape(-1)
        if factors.size != head_dim // 2 or not (np.isfinite(factors).all() and (factors > 0).all()):
            raise CorruptModelError(f"{self.path}: {ROPE_FREQS} holds {factors.size} factors, expected "
                                    f"{head_dim // 2} positive ones (head_dim {head_dim} / 2)", _REFETCH)
        if rope_scaling is not None:
            if rope_scaling["rope_type"] != "linear":
                raise UnsupportedModelError(f"{self.path}: {ROPE_FREQS} together with {rope_scaling['rope_type']!r} "
                                            "RoPE scaling is not supported",
                                            "use a GGUF with rope_freqs alone or with linear scaling")
            factors = factors * rope_scaling["factor"]  # llama.cpp: freq_scale and freq_factors both divide
        return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}

    # ----------------------------------------------------------------- weights
    def weights(self, config: ModelConfig) -> dict[str, torch.Tensor]:
        """Every tensor dequantized to fp32, renamed to Hugging Face names, q/k un-permuted (llama)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out: dict[str, torch.Tensor] = {}
        for t in self._reader.tensors:
            if t.name == ROPE_FREQS:  # not a weight: config() carries it as rope_scaling["factors"]
                continue
            name = hf_tensor_name(t.name)
            if name is None:
                raise UnsupportedModelError(f"{self.path}: tensor {t.name!r} has no place in a {config.architecture} model",
                                            "use a plain dense llama/qwen2/qwen3 GGUF (no MoE, no extra heads)")
            shape = tuple(int(x) for x in reversed([int(n) for n in t.shape]))
            if int(t.data.nbytes) != int(t.n_bytes):
                raise CorruptModelError(f"{self.path}: tensor {t.name} is cut short ({t.data.nbytes} of {t.n_bytes} bytes)",
                                        _REFETCH)
            try:
                qtype = GGMLQuantizationType(int(t.tensor_type))
                arr = dequantize(t.data, qtype)
            except (NotImplementedError, ValueError) as exc:
                raise UnsupportedModelError(f"{self.path}: tensor type {getattr(t.tensor_type, 'name', t.tensor_type)} "
                                            f"of {t.name} is not supported",
                                            "use a GGUF with F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5/K-quant tensors") from exc
            try:
                arr = np.asarray(arr, dtype=np.float32).reshape(shape)
            except ValueError as exc:
                raise CorruptModelError(f"{self.path}: tensor {t.name} holds {arr.size} values, its shape says "
                                        f"{list(shape)}", _REFETCH) from exc
            if get_architecture(config.architecture).permuted_qk and (".attn_q." in t.name or ".attn_k." in t.name):
                n_head = config.num_heads if ".attn_q." in t.name else config.num_kv_heads
                if arr.shape[0] != n_head * config.head_dim:
                    raise CorruptModelError(f"{self.path}: tensor {t.name} has {arr.shape[0]} rows, expected "
                                            f"{n_head} heads x {config.head_dim}", _REFETCH)
                arr = unpermute_rows(arr, n_head)
            if not (arr.flags.writeable and arr.flags.c_contiguous):  # F32 tensors are views of the read-only map
                arr = np.array(arr, dtype=np.float32, order="C")
            out[name] = torch.from_numpy(arr)
        check_weights(out, config, str(self.path), _REFETCH)
        return out

    def tensor_types(self) -> dict[str, str]:
        """{Hugging Face name: GGML type name} of every tensor that has one (F32, F16, Q4_1, Q5_K, ...)."""
        return {hf_tensor_name(t.name): getattr(t.tensor_type, "name", str(t.tensor_type))
                for t in self._reader.tensors if hf_tensor_name(t.name) is not None}

    def block_tensors(self, kinds) -> dict[str, tuple[str, np.ndarray, tuple[int, int]]]:
        """{Hugging Face name: (type name, raw bytes, (rows, cols))} for the 2-D tensors stored in one of
        `kinds` (e.g. "Q4_1"), untouched: quantized weights run them as stored (models/loader/quantized.py)."""
        out = {}
        for t in self._reader.tensors:
            kind = getattr(t.tensor_type, "name", str(t.tensor_type))
            name = hf_tensor_name(t.name)
            if kind in kinds and name is not None and len(t.shape) == 2:
                if int(t.data.nbytes) != int(t.n_bytes):
                    raise CorruptModelError(f"{self.path}: tensor {t.name} is cut short", _REFETCH)
                cols, rows = (int(x) for x in t.shape)
                out[name] = (kind, np.asarray(t.data).reshape(-1), (rows, cols))
        return out

    # ----------------------------------------------------------------- tokenizer
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf_metadata(self._meta)

    def close(self) -> None:
        """Drop the memory map (the reader holds the file open)."""
        self._reader = None
