"""The Hugging Face config.json of a Llama-family model, read into a ModelConfig and written from one.

Reads both the transformers 4 keys (rope_theta, rope_scaling) and the transformers 5 ones
(rope_parameters: {"rope_theta", "rope_type", ...}).
"""
from __future__ import annotations

from typing import Any, Iterable

from tierlm.config import EngramConfig, ModelConfig
from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.core.registry import architecture_names, get_architecture
TIERLM_KEY = "tierlm"  # our own block inside config.json: {"model_id", "source", ...}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters")
    params = dict(params) if isinstance(params, dict) else {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    scaling = dict(scaling) if isinstance(scaling, dict) else params
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type") in (None, "default"):
        scaling = None
    return float(theta), scaling


ENGRAM_KEYS = {"layers", "row_dim", "rows_per_head", "orders", "heads", "seed", "conv", "conv_kernel", "num_ids"}


def _engram(cfg: dict, where: str) -> EngramConfig | None:
    """A V4-mini config.json's "engram" block (the EngramConfig fields; unknown keys are an error, not ignored)."""
    block = cfg.get("engram")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise CorruptModelError(f"{where}: \"engram\" is not an object", f"fix {where}")
    unknown = sorted(set(block) - ENGRAM_KEYS)
    if unknown:
        raise CorruptModelError(f"{where}: unknown engram key(s) {unknown}", f"use only {sorted(ENGRAM_KEYS)}")
    if "layers" not in block:
        raise CorruptModelError(f"{where}: the engram block lacks \"layers\"", "list the Engram layers")
    kw = dict(block)
    kw["layers"] = tuple(int(i) for i in kw["layers"])
    if "orders" in kw:
        kw["orders"] = tuple(int(n) for n in kw["orders"])
    return EngramConfig(**kw)


def model_config_from_hf(cfg: dict, *, where: str, model_id: str,
                         extra_eos_token_ids: Iterable[int] = ()) -> ModelConfig:
    """ModelConfig from a parsed config.json. `extra_eos_token_ids`: generation_config / tokenizer ones."""
    fix = f"fix or re-download {where}"
    model_type = cfg.get("model_type")
    if get_architecture(model_type) is None:
        raise UnsupportedModelError(f"model_type {model_type!r} in {where} is not supported",
                                    f"use a {', '.join(architecture_names())} model")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        theta, scaling = _rope(cfg)
        window = None
        if model_type == "mistral" or cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window")
        eos = list(dict.fromkeys(_ids(cfg.get("eos_token_id")) + [int(i) for i in extra_eos_token_ids]))
        bos = cfg.get("bos_token_id")
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise CorruptModelError(f"{where}: num_attention_heads {heads} is not a multiple of "
                                    f"num_key_value_heads {kv_heads}", fix)
        return ModelConfig(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            rope_theta=theta,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_scaling=scaling,
            sliding_window=int(window) if window else None,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=tuple(eos),
            model_id=str((cfg.get(TIERLM_KEY) or {}).get("model_id") or model_id),
            engram=_engram(cfg, where) if model_type == "v4mini" else None,
            attention_type=str(cfg.get("attention_type", "gqa")),
        )
    except KeyError as exc:
        raise CorruptModelError(f"{where} lacks the key {exc.args[0]!r}", fix) from exc
    except (TypeError, ValueError) as exc:
        raise CorruptModelError(f"{where} has a malformed value: {_first_line(exc)}", fix) from exc


def model_config_to_hf(config: ModelConfig, **tierlm_info: Any) -> dict:
    """config.json content that transformers and `model_config_from_hf` both read back to `config`."""
    eos: Any = list(config.eos_token_ids)
    if len(eos) == 1:
        eos = eos[0]
    cfg: dict[str, Any] = {
        "architectures": [get_architecture(config.architecture).hf_class],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos if eos != [] else None,
        "torch_dtype": "float32",
    }
    if config.engram is not None:
        import dataclasses

        cfg["engram"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config.engram).items()}
    if config.architecture == "v4mini":
        cfg["attention_type"] = config.attention_type
    if config.sliding_window:
        cfg["sliding_window"] = config.sliding_window
        cfg["use_sliding_window"] = True
    cfg[TIERLM_KEY] = {"model_id": config.model_id, **tierlm_info}
    return cfg
