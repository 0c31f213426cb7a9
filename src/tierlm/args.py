"""Command-line pieces shared by `tierlm generate/chat/serve/bench`: sizes and the engine flags.

Imports only config and the core registry, so building a parser never imports torch.
"""
from __future__ import annotations

import argparse
import re

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig
from tierlm.core.registry import DTYPE_CHOICES

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 512MiB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="GGUF file, Hugging Face directory, or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="KV block pool budget, e.g. 2GiB")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--attention-backend", default="auto",
                   help="auto (cpu where it runs, else torch) | cpu (native decode, fp32 CPU) | torch (gather + SDPA)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags of add_engine_args describe (validated)."""
    model = None if args.model in (None, "", "default") else args.model
    cache = CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks, memory_bytes=args.kv_cache_memory,
                        enable_prefix_caching=not args.no_prefix_caching)
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    return EngineConfig(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                        cache=cache, scheduler=sched, attention_backend=args.attention_backend)
