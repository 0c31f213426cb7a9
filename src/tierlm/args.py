"""Command-line pieces shared by `tierlm generate/chat/serve/bench`: sizes and the engine flags.

Imports only config and the core registry, so building a parser never imports torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import re

from tierlm.config import (ENGRAM_PREFETCH_MODES, ENGRAM_TABLE_BACKENDS, PREEMPTION_MODES, SPARSE_SELECTORS,
                           TIER_POLICIES, WRITE_POLICIES, CacheConfig, DriftGuardConfig, EngineConfig, SchedulerConfig,
                           SparseConfig, TierConfig)
from tierlm.core.errors import InvalidParameterError
from tierlm.core.registry import DTYPE_CHOICES, QUANT_ACTIVATIONS, QUANTIZATION_CHOICES, implemented_kv_formats

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 512MiB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    """1073741824 -> '1GiB', 1536 -> '1.5KiB', 1000 -> '1000B'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n}B"


def _tier_default(name: str):
    """A TierConfig field's default: the dataclass is the one place the numbers live."""
    return {f.name: f.default for f in dataclasses.fields(TierConfig)}[name]


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} < 0; use 0 or more")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _positive_bytes(text: str) -> int:
    value = parse_bytes(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a size like 512MiB")
    return value


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a redis:// URL; use redis://HOST:PORT[/DB]")
    return text


def _prefix_file(path: str) -> str:
    """--pin-prefix-file: checked readable at parse time (a bad path is a usage error); `tier_config` reads it.
    The flag keeps the path, so the flags can be handed on to another process unchanged."""
    _read_prefix_file(path, argparse.ArgumentTypeError)
    return path


def _read_prefix_file(path: str, error=None) -> str:
    """The whole file is one prefix."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}"
        raise (error(why) if error else InvalidParameterError(why, "check the --pin-prefix-file path")) from None
    if not text:
        why = f"{path!r} is empty"
        raise error(why) if error else InvalidParameterError(why, "give a file holding the prefix text")
    return text


def add_tier_args(p: argparse.ArgumentParser, sizes_only: bool = False) -> None:
    """The KV tier flags (defaults from TierConfig). `sizes_only`: just the tiers' locations and sizes
    (what `tierlm info` needs to compute capacities)."""
    g = p.add_argument_group("KV tiers", "lower KV tiers below the device pool: a tier is on when given a size "
                             "(host) or a location (disk, Redis)")
    g.add_argument("--host-cache-memory", type=parse_bytes, default=_tier_default("host_memory_bytes"), metavar="SIZE",
                   help="host-memory KV tier size, e.g. 4GiB (default: off)")
    g.add_argument("--disk-cache-dir", default=_tier_default("disk_dir"), metavar="DIR",
                   help="directory of the disk KV tier (kept across runs; default: off)")
    g.add_argument("--disk-cache-size", type=_positive_bytes, default=_tier_default("disk_bytes"), metavar="SIZE",
                   help=f"disk KV tier size (default {format_bytes(_tier_default('disk_bytes'))})")
    g.add_argument("--redis-url", type=_redis_url, default=_tier_default("redis_url"), metavar="URL",
                   help="Redis/Valkey KV tier, redis://HOST:PORT[/DB] (default: off)")
    g.add_argument("--redis-cache-size", type=_positive_bytes, default=_tier_default("redis_bytes"), metavar="SIZE",
                   help=f"bytes the Redis KV tier may use (default {format_bytes(_tier_default('redis_bytes'))})")
    if sizes_only:
        return
    g.add_argument("--tier-eviction", choices=TIER_POLICIES, default=_tier_default("eviction_policy"),
                   help=f"eviction policy inside every tier (default {_tier_default('eviction_policy')})")
    g.add_argument("--tier-write", choices=WRITE_POLICIES, default=_tier_default("write_policy"),
                   help="write_back: demote blocks as the device evicts them; write_through: store every new "
                        f"block in every tier at once (default {_tier_default('write_policy')})")
    g.add_argument("--tier-admit-after-hits", type=_non_negative_int, default=_tier_default("admit_after_hits"),
                   metavar="N", help="disk and Redis store a block only after N prefix hits "
                                     f"(default {_tier_default('admit_after_hits')}: every block)")
    g.add_argument("--tier-load-budget", type=parse_bytes, default=_tier_default("load_step_budget_bytes"),
                   metavar="SIZE", help="bytes of tier loads one engine step waits for; larger loads overlap "
                                        f"decoding (default {format_bytes(_tier_default('load_step_budget_bytes'))})")
    g.add_argument("--tier-load-timeout", type=_positive_seconds, default=_tier_default("load_timeout_s"),
                   metavar="SECONDS", help="a tier load slower than this is recomputed instead "
                                           f"(default {_tier_default('load_timeout_s')})")
    g.add_argument("--preemption", choices=PREEMPTION_MODES, default=_tier_default("preemption_mode"),
                   help="what a preempted sequence's KV does: recompute it, offload it to the host tier, or auto "
                        f"(cheaper of the two; default {_tier_default('preemption_mode')})")
    # default None, not []: an unset list flag has no value to hand on (bench.overhead.engine_flags)
    g.add_argument("--pin-prefix", action="append", default=None, dest="pin_prefixes", metavar="TEXT",
                   help="keep this prompt prefix's KV cached on the device and in every tier (repeatable)")
    g.add_argument("--pin-prefix-file", action="append", type=_prefix_file, default=None, dest="pin_prefix_files",
                   metavar="PATH", help="as --pin-prefix, with the file's whole contents as the prefix (repeatable)")


def tier_config(args: argparse.Namespace) -> TierConfig:
    """The TierConfig the flags of add_tier_args describe (validated). Flags a parser lacks keep their defaults."""
    def get(flag: str, field: str):
        return getattr(args, flag, _tier_default(field))

    pins = tuple(getattr(args, "pin_prefixes", None) or ())
    pins += tuple(_read_prefix_file(path) for path in getattr(args, "pin_prefix_files", None) or ())
    return TierConfig(
        host_memory_bytes=get("host_cache_memory", "host_memory_bytes"), disk_dir=get("disk_cache_dir", "disk_dir") or None,
        disk_bytes=get("disk_cache_size", "disk_bytes"), redis_url=get("redis_url", "redis_url") or None,
        redis_bytes=get("redis_cache_size", "redis_bytes"), eviction_policy=get("tier_eviction", "eviction_policy"),
        write_policy=get("tier_write", "write_policy"), admit_after_hits=get("tier_admit_after_hits", "admit_after_hits"),
        load_step_budget_bytes=get("tier_load_budget", "load_step_budget_bytes"),
        load_timeout_s=get("tier_load_timeout", "load_timeout_s"), preemption_mode=get("preemption", "preemption_mode"),
        pinned_prefixes=tuple(dict.fromkeys(pins)))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="GGUF file, Hugging Face directory, or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES,
                   help="weight format: none (the checkpoint's dtype) | q4_1, q4_0, q8_0 (GGUF blocks: run as stored "
                        "when the GGUF holds them, else quantized) | int8 (per output channel) | int4 (per group, "
                        "see --quant-group) | fp8, fp8_ue8m0 (e4m3 with an fp32 / power-of-two scale per 128x128 "
                        "block, DeepSeek-V3's recipe) | gguf (each tensor in the block type its GGUF stores: "
                        "Q4_0/Q4_1/Q8_0/Q5_0/Q5_1 exactly, Q4_K/Q5_K with fp16 scales, others as q8_0); built once "
                        "and cached. CPU: native kernels (int8 dot products; FP8 widened to fp32)")
    g.add_argument("--quant-group", type=int, default=None, metavar="N",
                   help="int4 group size: 32 (default), 64 or 128; must divide every linear's input size")
    g.add_argument("--quant-activations", default="int16", choices=QUANT_ACTIVATIONS,
                   help="how an integer-quantized linear takes its input on the CPU (FP8 weights always take fp32): int16 (default: rounded per 32 values to "
                        "16 bits, integer dot products; near-exact) | int8 (8 bits: the fastest, llama.cpp's scheme, "
                        "measurably lossy) | fp32 (exact up to summation order: the fp32 model's greedy tokens; "
                        "compute-bound, slower)")
    g.add_argument("--engram-backend", default="device", choices=ENGRAM_TABLE_BACKENDS,
                   help="V4-mini models: where the Engram tables are served from: device (a copy on the compute "
                        "device; default) | host (host memory, pinned on CUDA) | mmap (the checkpoint file mapped in "
                        "place, for tables larger than memory); rows are prefetched on a worker thread either way")
    g.add_argument("--engram-prefetch", default="auto", choices=ENGRAM_PREFETCH_MODES,
                   help="V4-mini models: when Engram rows are gathered: ahead (a decode token's rows as soon as it is "
                        "sampled, while the engine finishes the step and schedules the next) | step (when the step "
                        "is laid out) | off (synchronously in the layer) | auto (default: ahead on CUDA; on a CPU, "
                        "where a prefetch thread takes cores from the forward pass, ahead for steps of at most 2 "
                        "tokens, in the layer otherwise)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="KV block pool budget, e.g. 2GiB")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--kv-format", default="auto", choices=["auto", *implemented_kv_formats()],
                   help="KV cache format: auto (the compute dtype), fp32, bf16, fp16, or FP8 (fp8_e4m3 = e4m3 with "
                        "one fp32 scale per token and head; _ue8m0: power-of-two scales; _g64/_g128: per 64/128 "
                        "values; _static: calibrated scales, see `tierlm calibrate`)")
    g.add_argument("--kv-scales", default=None, metavar="PATH",
                   help="calibration file for a static FP8 KV format (default: the one `tierlm calibrate` wrote)")
    g.add_argument("--attention-backend", default="auto",
                   help="auto (cpu where it runs, else torch) | cpu (native decode, fp32 CPU) | torch (gather + SDPA) "
                        "| triton (in-place paged decode on CUDA, FP8 KV read as bytes; needed for captured decode)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="never replay decode steps from CUDA graphs (captured by default on CUDA with "
                        "--attention-backend triton)")
    g.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="batch sizes to capture decode steps for (default 1 2 4 8 16 24 ... --max-num-seqs); "
                        "a step is padded up to the next one")
    add_tier_args(p)
    add_sparse_args(p)
    add_drift_guard_args(p)


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    d = SparseConfig()
    g = p.add_argument_group("sparse decoding (which KV blocks a decode step reads)")
    g.add_argument("--sparse", default="dense", choices=SPARSE_SELECTORS,
                   help="dense (every block) | quest (per-block key bounds pick the blocks; prefill stays dense) | "
                        "index (a scan of FP8 copies of the keys picks the blocks: far closer to dense than quest; native on the "
                        "CPU) | "
                        "indexer (a model's trained lightning indexer picks tokens; none of the loadable models has one)")
    g.add_argument("--sparse-budget", type=int, default=d.budget_tokens, metavar="TOKENS",
                   help=f"KV tokens a sparse decode step reads per sequence and layer (default {d.budget_tokens})")
    g.add_argument("--sparse-sink", type=int, default=d.sink_tokens, metavar="TOKENS",
                   help=f"first tokens always read (default {d.sink_tokens})")
    g.add_argument("--sparse-window", type=int, default=d.window_tokens, metavar="TOKENS",
                   help=f"last tokens always read (default {d.window_tokens})")
    g.add_argument("--sparse-dense-layers", type=int, default=d.dense_layers, metavar="N",
                   help=f"the first N layers read every block (default {d.dense_layers})")
    g.add_argument("--sparse-spill", type=_positive_bytes, default=None, metavar="SIZE",
                   help="let running sequences spill cold KV blocks to this much host memory (or a file, with "
                        "--sparse-spill-dir), so a context can exceed the device pool; needs --sparse quest")
    g.add_argument("--sparse-spill-dir", default=None, metavar="DIR",
                   help="back the spilled blocks with a file in DIR (mapped into memory; removed at exit)")
    g.add_argument("--sparse-staging", type=_non_negative_int, default=0, metavar="TOKENS",
                   help="device KV tokens that hold, per layer, the spilled blocks a step picks (default: twice "
                        "the budget)")


def sparse_config(args: argparse.Namespace) -> SparseConfig:
    spill = dict(spill_bytes=getattr(args, "sparse_spill", None) or 0, spill_dir=getattr(args, "sparse_spill_dir", None),
                 staging_tokens=getattr(args, "sparse_staging", 0))
    if getattr(args, "sparse", "dense") == "dense":
        return SparseConfig(**spill)  # refuses a spill size without a selector
    return SparseConfig(selector=args.sparse, budget_tokens=args.sparse_budget, sink_tokens=args.sparse_sink,
                        window_tokens=args.sparse_window, dense_layers=args.sparse_dense_layers, **spill)


def add_drift_guard_args(p: argparse.ArgumentParser) -> None:
    d = DriftGuardConfig()
    g = p.add_argument_group("drift guard (runtime rollback of a lossy KV format)")
    g.add_argument("--drift-guard", type=float, default=0.0, metavar="FRACTION",
                   help="shadow-score this share of finished requests against a reference forward in the compute "
                        "dtype, off the hot path; on drift, new requests switch to the safe KV format (default 0: off)")
    g.add_argument("--drift-guard-max-kl", type=float, default=d.max_kl_mean, metavar="NATS",
                   help=f"trip above this mean KL per token over the window (default {d.max_kl_mean})")
    g.add_argument("--drift-guard-min-top1", type=float, default=d.min_top1_agreement, metavar="RATE",
                   help=f"trip below this top-1 agreement over the window (default {d.min_top1_agreement})")
    g.add_argument("--drift-guard-window", type=int, default=d.window_tokens, metavar="TOKENS",
                   help=f"scored tokens the decision looks at (default {d.window_tokens}; decided from "
                        f"{d.min_tokens} on)")
    g.add_argument("--drift-state", default=None, metavar="PATH",
                   help="where a trip is remembered across restarts (default: the user cache dir)")
    g.add_argument("--drift-rearm", action="store_true",
                   help="forget a remembered trip at start: serve the configured KV format again")


def drift_guard_config(args: argparse.Namespace) -> DriftGuardConfig:
    fraction = getattr(args, "drift_guard", 0.0) or 0.0
    if not fraction:
        if getattr(args, "drift_rearm", False):
            raise InvalidParameterError("--drift-rearm re-arms the drift guard, which is off",
                                        "add --drift-guard FRACTION")
        return DriftGuardConfig()
    window = args.drift_guard_window
    return DriftGuardConfig(fraction=fraction, max_kl_mean=args.drift_guard_max_kl,
                            min_top1_agreement=args.drift_guard_min_top1, window_tokens=window,
                            min_tokens=min(DriftGuardConfig.min_tokens, window), state_path=args.drift_state,
                            rearm=args.drift_rearm)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags of add_engine_args describe (validated)."""
    model = None if args.model in (None, "", "default") else args.model
    kv_format = getattr(args, "kv_format", "auto")
    cache = CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks, memory_bytes=args.kv_cache_memory,
                        enable_prefix_caching=not args.no_prefix_caching,
                        kv_format=None if kv_format == "auto" else kv_format,
                        kv_scales_path=getattr(args, "kv_scales", None))
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    return EngineConfig(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                        cache=cache, scheduler=sched, tiers=tier_config(args),
                        attention_backend=args.attention_backend, drift_guard=drift_guard_config(args),
                        sparse=sparse_config(args), quantization=getattr(args, "quantization", "none"),
                        quant_group=getattr(args, "quant_group", None),
                        quant_activations=getattr(args, "quant_activations", "int8"),
                        engram_backend=getattr(args, "engram_backend", "device"),
                        engram_prefetch=getattr(args, "engram_prefetch", "auto"),
                        captured_decode="off" if getattr(args, "enforce_eager", False) else "auto",
                        cuda_graph_sizes=tuple(getattr(args, "cuda_graph_sizes", None) or ()))
