"""Named engine configurations a benchmark compares, behind one registry.

Each entry is a transform of the reference config ("baseline": dense attention, the model's dtype
(fp32 on CPU, bf16 on CUDA), device-only KV, no prefix cache, no chunked prefill). `all` applies
every other entry's transform in registry order. Only features that exist are registered: the
issue that lands KV tiers, FP8 KV or sparse decode adds its entry here (with a gate tolerance if
its greedy tokens may legitimately drift) and `all` picks it up.

Without chunked prefill a prompt must fit one step, so `reference_config` raises the step token
budget to the longest prompt of the plan; chunking configs keep the budget the user gave.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig
from tierlm.core.errors import InvalidParameterError

Transform = Callable[[EngineConfig], EngineConfig]


@dataclass(frozen=True)
class BenchConfig:
    """A named configuration. `tolerance`: gate prompts (and run requests) allowed to diverge from the
    reference before the config is flagged: 0 for exact features; lossy ones (FP8 KV, sparse decode,
    quantized weights) set the thresholds their issue defines."""

    name: str
    summary: str
    apply: Transform
    tolerance: int = 0


def _prefix_cache(c: EngineConfig) -> EngineConfig:
    return replace(c, cache=replace(c.cache, enable_prefix_caching=True))


def _chunked_prefill(c: EngineConfig) -> EngineConfig:
    return replace(c, scheduler=replace(c.scheduler, enable_chunked_prefill=True))


BASELINE = "baseline"
ALL = "all"

_OPTIMIZATIONS: tuple[BenchConfig, ...] = (
    BenchConfig("prefix-cache", "automatic prefix caching (chained block hashes, LRU reuse)", _prefix_cache),
    BenchConfig("chunked-prefill", "long prompts split across steps so decodes never wait", _chunked_prefill),
)


def _all(c: EngineConfig) -> EngineConfig:
    for opt in _OPTIMIZATIONS:
        c = opt.apply(c)
    return c


CONFIGS: dict[str, BenchConfig] = {c.name: c for c in (
    BenchConfig(BASELINE, "reference: dense, device-only KV in the model dtype, no prefix cache, no chunking",
                lambda c: c),
    *_OPTIMIZATIONS,
    BenchConfig(ALL, "every optimization above together", _all,
                tolerance=max((o.tolerance for o in _OPTIMIZATIONS), default=0)),
)}


def get_config(name: str) -> BenchConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise InvalidParameterError(f"unknown config {name!r}", f"use one of {', '.join(CONFIGS)}") from None


def reference_config(model: str | None, dtype: str, device: str, max_model_len: int | None, kv_memory: int,
                     max_num_seqs: int, max_num_batched_tokens: int, longest_prompt: int) -> EngineConfig:
    """The baseline EngineConfig that every named config transforms."""
    return EngineConfig(
        model=model, dtype=dtype, device=device, max_model_len=max_model_len,
        cache=CacheConfig(memory_bytes=kv_memory, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, enable_chunked_prefill=False,
                                  max_num_batched_tokens=max(max_num_batched_tokens, longest_prompt)),
    )


def engine_config(name: str, reference: EngineConfig, max_num_batched_tokens: int) -> EngineConfig:
    """The EngineConfig of config `name`; a chunking config gets the user's step budget back."""
    cfg = get_config(name).apply(reference)
    if cfg.scheduler.enable_chunked_prefill:
        cfg = replace(cfg, scheduler=replace(cfg.scheduler, max_num_batched_tokens=max_num_batched_tokens))
    return cfg


def gate_engine_config(name: str, reference: EngineConfig, num_blocks: int, step_tokens: int,
                       chunk: int) -> EngineConfig:
    """The engine the correctness gate runs config `name` on: the reference with a pool of `num_blocks`
    (small: the gate set preempts and evicts) and a step budget of `step_tokens` (room to admit the first
    wave at once), then the config's transform; a chunking config gets `chunk` tokens per step, so long
    prompts cross many chunk borders."""
    ref = replace(reference, cache=replace(reference.cache, num_blocks=num_blocks, memory_bytes=None),
                  scheduler=replace(reference.scheduler, max_num_batched_tokens=max(step_tokens, chunk)))
    return engine_config(name, ref, chunk)
