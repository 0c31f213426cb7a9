"""The two sides of a drift run: CONFIG strings and the engines built from them.

    CONFIG := KV_FORMAT | KEY=VALUE[,KEY=VALUE...]      (one bare KV format name may stand for kv_format=)
    KEY    := kv_format | kv_scales | attention_backend | dtype | quantization | quant_group | quant_activations

    fp8_e4m3
    kv_format=fp8_e4m3_static,kv_scales=/path/scales.json
    kv_format=fp32,attention_backend=torch
    quantization=int4,quant_group=32

Unset keys are "auto": the model dtype's KV format, the engine's default backend and dtype. The reference
defaults to all of them. Both engines get the same block pool (counted in blocks, not bytes, so both
schedule identically) and no prefix caching, so each side computes every token itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.core.registry import DTYPE_CHOICES, KV_FORMATS, get_kv_format, implemented_kv_formats

KEYS = ("kv_format", "kv_scales", "attention_backend", "dtype", "quantization", "quant_group", "quant_activations")
EXAMPLE = "e.g. fp8_e4m3 or kv_format=fp8_e4m3_static,kv_scales=scales.json"


@dataclass(frozen=True)
class Side:
    kv_format: str = "auto"
    kv_scales: str | None = None
    attention_backend: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"  # weight format (tierlm.quant.weights)
    quant_group: str | None = None
    quant_activations: str = "int16"

    @property
    def label(self) -> str:
        """The canonical CONFIG string (keys that are not auto; "auto" when none)."""
        items = [f"{k}={v}" for k, v in asdict(self).items()
                 if v not in (None, "auto", "none") and (k, v) != ("quant_activations", "int16")]
        if items == [f"kv_format={self.kv_format}"]:
            return self.kv_format
        return ",".join(items) or "auto"

    @property
    def scaled(self) -> bool:
        return self.kv_format != "auto" and get_kv_format(self.kv_format).scaled


def parse_side(text: str, flag: str = "--candidate") -> Side:
    """A CONFIG string -> Side; InvalidParameterError naming the fix for unknown keys or values."""
    if text is None or not text.strip():
        raise InvalidParameterError(f"{flag} is empty", f"give a KV format or key=value pairs ({EXAMPLE})")
    values: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise InvalidParameterError(f"{flag} {text!r} has an empty item", f"separate key=value pairs by single commas ({EXAMPLE})")
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            key, value = "kv_format", item
        if key not in KEYS:
            raise InvalidParameterError(f"{flag}: unknown key {key!r}", f"use keys among {', '.join(KEYS)} ({EXAMPLE})")
        if not value:
            raise InvalidParameterError(f"{flag}: {key} has no value", f"write {key}=VALUE")
        if key in values:
            raise InvalidParameterError(f"{flag}: {key} is given twice", "give each key once")
        values[key] = value
    side = Side(**values)
    _validate(side, flag)
    return side


def _validate(side: Side, flag: str) -> None:
    if side.kv_format != "auto":
        if side.kv_format not in KV_FORMATS or not KV_FORMATS[side.kv_format].implemented:
            raise InvalidParameterError(f"{flag}: unknown KV format {side.kv_format!r}",
                                        f"use auto or one of {', '.join(implemented_kv_formats())}")
    if side.dtype not in DTYPE_CHOICES:
        raise InvalidParameterError(f"{flag}: unknown dtype {side.dtype!r}", f"use one of {', '.join(DTYPE_CHOICES)}")
    if side.quant_group is not None and not side.quant_group.isdigit():
        raise InvalidParameterError(f"{flag}: quant_group {side.quant_group!r} is not a number", "write e.g. quant_group=32")
    try:
        _quant_fields(side)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{flag}: {exc.problem}", exc.fix) from None
    from tierlm.attention import BACKENDS

    if side.attention_backend != "auto" and side.attention_backend not in BACKENDS:
        raise InvalidParameterError(f"{flag}: unknown attention backend {side.attention_backend!r}",
                                    f"use auto or one of {', '.join(BACKENDS)}")
    if side.kv_scales is not None:
        if side.kv_format == "auto" or not get_kv_format(side.kv_format).static:
            raise InvalidParameterError(f"{flag}: kv_scales is only read by a static FP8 KV format",
                                        "add kv_format=fp8_e4m3_static (or fp8_e5m2_static), or drop kv_scales")
        if not Path(side.kv_scales).expanduser().is_file():
            raise InvalidParameterError(f"{flag}: KV scales file {side.kv_scales} does not exist",
                                        "give the path `tierlm calibrate` wrote")


def _quant_fields(side: Side) -> dict:
    """The EngineConfig fields of a side's weight format, checked by EngineConfig's own rules."""
    fields = {"quantization": side.quantization, "quant_group": int(side.quant_group) if side.quant_group else None,
              "quant_activations": side.quant_activations}
    EngineConfig(**fields)
    return fields


def engine_config(side: Side, model: str | None, device: str, num_blocks: int, block_size: int = 16,
                  max_num_seqs: int = 64) -> EngineConfig:
    """Sequences are capped at the pool (max_model_len = num_blocks * block_size; the model's context when
    smaller), which the caller sizes for the longest input."""
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=False,
                        kv_format=None if side.kv_format == "auto" else side.kv_format,
                        kv_scales_path=str(Path(side.kv_scales).expanduser()) if side.kv_scales else None)
    return EngineConfig(model=None if model in (None, "", "default") else model, dtype=side.dtype, device=device,
                        max_model_len=num_blocks * block_size, cache=cache, scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
                        attention_backend=side.attention_backend, **_quant_fields(side))


def describe_engine(side: Side, engine) -> dict:
    """What a side resolved to on this machine."""
    return {"config": side.label, **asdict(side), "resolved_kv_format": engine.kv_spec.format.name,
            "resolved_attention_backend": engine.attention_backend.name, "resolved_dtype": str(engine.dtype).removeprefix("torch."),
            "device": str(engine.device), "kv_scales_digest": engine.kv_scales.digest if engine.kv_scales else None}
