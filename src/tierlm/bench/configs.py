"""Named engine configurations a benchmark compares, behind one registry.

Each entry is a transform of the reference config ("baseline": dense attention, the model's dtype
(fp32 on CPU, bf16 on CUDA), device-only KV, no prefix cache, no chunked prefill). `all` applies
every other entry's transform in registry order. Only features that exist are registered. FP8 KV
(`fp8`, in `all`; `fp8-ue8m0`, run when named) is lossy: its gate applies the drift thresholds instead of
exact tokens (BenchConfig.lossy), and so does `all`'s.

KV tiers: a config names the lower tiers it runs with (`BenchConfig.tiers`: "host", "disk", "redis");
where they live and how big they are is the plan's business (tier flags, or the bench's defaults: see
bench/tiers.py), so `engine_config` takes that TierConfig and keeps only the config's tiers. `tiers`
(device + host + disk) is one of the optimizations `all` applies; `tiers-redis` (device + Redis) is not,
since it needs a server: it runs when named.

Without chunked prefill a prompt must fit one step, so `reference_config` raises the step token
budget to the longest prompt of the plan; chunking configs keep the budget the user gave.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig, SparseConfig, TierConfig
from tierlm.core.errors import InvalidParameterError

Transform = Callable[[EngineConfig], EngineConfig]


@dataclass(frozen=True)
class BenchConfig:
    """A named configuration. `tolerance`: gate prompts (and run requests) allowed to diverge from the
    reference before an exact config is flagged (0). `lossy`: the config changes numerics on purpose (FP8 KV;
    later sparse decode, quantized weights): its gate applies `tierlm drift`'s thresholds (gate.LossyGate)
    and its exact token diffs are reported, not gated. `tiers`: the lower KV tiers the config runs
    with, in lookup order (filled in by `engine_config` from the plan's TierConfig)."""

    name: str
    summary: str
    apply: Transform
    tolerance: int = 0
    tiers: tuple[str, ...] = ()
    lossy: bool = False  # numerics change by design (FP8 KV): gated by drift thresholds, not exact tokens
    in_default: bool = True  # run when --config is not given

    @property
    def needs_server(self) -> bool:
        """A Redis tier: a server must be given (--redis-url) or started for the run."""
        return "redis" in self.tiers


def _prefix_cache(c: EngineConfig) -> EngineConfig:
    return replace(c, cache=replace(c.cache, enable_prefix_caching=True))


def _chunked_prefill(c: EngineConfig) -> EngineConfig:
    return replace(c, scheduler=replace(c.scheduler, enable_chunked_prefill=True))


def _kv_format(fmt: str) -> Transform:
    def apply(c: EngineConfig) -> EngineConfig:
        return replace(c, cache=replace(c.cache, kv_format=fmt))
    return apply


def _tiered(c: EngineConfig) -> EngineConfig:
    """Lower tiers only pay off with prefix caching (they hold cached blocks) and chunked prefill."""
    return _chunked_prefill(_prefix_cache(c))


BASELINE = "baseline"
ALL = "all"
TIER_NAMES = ("host", "disk", "redis")  # lookup order, as the engine names them

_OPTIMIZATIONS: tuple[BenchConfig, ...] = (
    BenchConfig("prefix-cache", "automatic prefix caching (chained block hashes, LRU reuse)", _prefix_cache),
    BenchConfig("chunked-prefill", "long prompts split across steps so decodes never wait", _chunked_prefill),
    BenchConfig("tiers", "prefix cache + chunked prefill with KV tiers below the device pool: host memory, "
                "then a disk directory (device + host + disk)", _tiered, tiers=("host", "disk")),
    BenchConfig("fp8", "FP8 KV cache: e4m3 with one fp32 scale per token and KV head (12,240 vs 46,080 bytes/token "
                "on the default model); lossy: gated by drift thresholds", _kv_format("fp8_e4m3"), lossy=True),
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
                tolerance=max((o.tolerance for o in _OPTIMIZATIONS), default=0),
                lossy=any(o.lossy for o in _OPTIMIZATIONS),
                tiers=tuple(t for t in TIER_NAMES if any(t in o.tiers for o in _OPTIMIZATIONS))),
    BenchConfig("device-only", "prefix cache + chunked prefill, no KV tiers: what the tiers configs are measured "
                "against (evicted prefixes are recomputed); not in `all`, run only when named", _tiered,
                in_default=False),
    BenchConfig("fp8-ue8m0", "FP8 KV cache: e4m3 with one power-of-two (UE8M0, DeepSeek's rule) scale byte per token "
                "and KV head (11,700 bytes/token); lossy; not in `all`", _kv_format("fp8_e4m3_ue8m0"), lossy=True,
                in_default=False),
    BenchConfig("tiers-redis", "prefix cache + chunked prefill with a Redis/Valkey KV tier only (device + Redis): "
                "isolates the remote tier, the one replicas would share; not in `all` (it needs a server)",
                _tiered, tiers=("redis",)),
)}


def _v4(c: EngineConfig) -> EngineConfig:
    """DeepSeek-V4-style efficiency bets together: prefix cache + chunked prefill + host/disk tiers + sparse
    decoding ranked by FP8 index keys (DeepSeek V3.2's split: FP8 picks, attention over the KV as stored, here
    the model dtype), budget 1,024 tokens (`tierlm bench --claims` sets its own)."""
    return replace(_tiered(c), sparse=SparseConfig(selector="index"))


def _v4_fp8(c: EngineConfig) -> EngineConfig:
    """The first v4: FP8 KV + Quest's bound-ranked picks. Kept to show what the drift gate catches."""
    c = _kv_format("fp8_e4m3")(_tiered(c))
    return replace(c, sparse=SparseConfig(selector="quest"))


CONFIGS["v4"] = BenchConfig(
    "v4", "prefix cache + chunked prefill + host/disk KV tiers + sparse decode picked by FP8 index keys (1,024-token "
    "budget) over model-dtype KV: the claims check's config (tierlm bench --claims); lossy; not in `all`", _v4,
    tiers=("host", "disk"), lossy=True, in_default=False)
CONFIGS["v4-fp8"] = BenchConfig(
    "v4-fp8", "prefix cache + chunked prefill + host/disk KV tiers + FP8 KV + Quest sparse decode (1,024-token budget): "
    "the first v4, which the drift gate flags on the default model (tierlm bench --claims --claims-config v4-fp8); "
    "lossy; not in `all`", _v4_fp8, tiers=("host", "disk"), lossy=True, in_default=False)


def _weights(fmt: str, activations: str = "int16", group: int | None = None) -> Transform:
    def apply(c: EngineConfig) -> EngineConfig:
        return replace(c, quantization=fmt, quant_group=group, quant_activations=activations)
    return apply


# Quantized weights (tierlm.quant.weights; run when named). q4_1 runs the default model's own GGUF blocks: with
# fp32 activations (q4_1-fp32) the fp32 model's numbers up to summation order, gated on exact tokens; with the
# default int16 activations equal but for exact ties, so gated by the drift thresholds like every lossy config.
for _name, _summary, _apply, _lossy in (
        ("q4_1", "Q4_1 weights as stored in the GGUF (98 MB vs 625 MB fp32 on the default model), int16 activations "
                 "(the default): the fp32 model's tokens but at exact ties; gated by drift thresholds",
         _weights("q4_1"), True),
        ("q4_1-fp32", "Q4_1 weights as stored, fp32 activations: the fp32 model's numbers up to summation order; "
                      "exact", _weights("q4_1", "fp32"), False),
        ("q4_1-int8", "Q4_1 weights with activations rounded to int8 per 32 values (llama.cpp's scheme): the "
                      "fastest; lossy", _weights("q4_1", "int8"), True),
        ("int8", "int8 weights per output channel, int16 activations; lossy", _weights("int8"), True),
        ("int4", "int4 weights quantized from fp32 in groups of 32 (scale + min), int16 activations; lossy",
         _weights("int4"), True),
        ("fp8-weights", "FP8 e4m3 weights with an fp32 scale per 128x128 block (DeepSeek-V3's recipe; an FP8 "
                        "checkpoint's as stored, else quantized), fp32 activations; lossy unless the checkpoint is "
                        "FP8", _weights("fp8", "fp32"), True)):
    CONFIGS[_name] = BenchConfig(_name, _summary + "; not in `all`", _apply, lossy=_lossy, in_default=False)


def _engram(backend: str, prefetch: str = "auto", cold: bool = False) -> Transform:
    def apply(c: EngineConfig) -> EngineConfig:
        return replace(c, engram_backend=backend, engram_prefetch=prefetch, engram_cold_start=cold)
    return apply


# Where a V4-mini model's Engram tables are served from and when their rows are gathered (the reference: on the
# device, --engram-prefetch auto); exact, since a row is a row wherever and whenever it is read. The cold configs
# drop the table file from the page cache when their engine starts, so first reads go to the disk; prefetched ahead,
# at step layout or not at all, they show how much of that latency each hides. On a Llama-family model these change
# nothing.
for _name, _args, _summary in (
        ("engram-host", ("host",), "V4-mini Engram tables in host memory (pinned on CUDA)"),
        ("engram-mmap", ("mmap",), "V4-mini Engram tables memory-mapped from the checkpoint file on disk (tables "
                                   "larger than memory)"),
        ("engram-mmap-cold", ("mmap", "auto", True), "engram-mmap from a cold page cache (first reads of each row go "
                                                     "to the disk)"),
        ("engram-mmap-cold-ahead", ("mmap", "ahead", True), "engram-mmap-cold, rows of every decode token prefetched "
                                                            "as soon as it is sampled"),
        ("engram-mmap-cold-step", ("mmap", "step", True), "engram-mmap-cold, rows prefetched when the step is laid "
                                                          "out"),
        ("engram-mmap-cold-off", ("mmap", "off", True), "engram-mmap-cold with no prefetch (rows read in the layer)"),
        ("engram-off", ("device", "off"), "Engram tables on the device, no prefetch (rows read in the layer)")):
    CONFIGS[_name] = BenchConfig(_name, _summary + "; exact; not in `all`", _engram(*_args), in_default=False)


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


def config_tiers(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The lower tiers any of these configs runs with, in lookup order."""
    used = {t for n in names for t in get_config(n).tiers}
    return tuple(t for t in TIER_NAMES if t in used)


def select_tiers(tiers: TierConfig | None, names: tuple[str, ...], config: str = "") -> TierConfig:
    """`tiers` with only the named lower tiers on (the others' locations and sizes cleared); every named
    tier must have its location (host: a size, disk: a directory, redis: a URL)."""
    if not names:
        return TierConfig()
    tiers = tiers or TierConfig()
    missing = [t for t, have in (("host", tiers.host_memory_bytes), ("disk", tiers.disk_dir),
                                 ("redis", tiers.redis_url)) if t in names and not have]
    if missing:
        raise InvalidParameterError(f"config {config or '?'} runs with the {'/'.join(missing)} KV tier but the plan "
                                    "gives it no location", "pass --host-cache-memory / --disk-cache-dir / --redis-url")
    return replace(tiers, host_memory_bytes=tiers.host_memory_bytes if "host" in names else 0,
                   disk_dir=tiers.disk_dir if "disk" in names else None,
                   redis_url=tiers.redis_url if "redis" in names else None)


def engine_config(name: str, reference: EngineConfig, max_num_batched_tokens: int,
                  tiers: TierConfig | None = None) -> EngineConfig:
    """The EngineConfig of config `name`; a chunking config gets the user's step budget back. A config with
    lower tiers gets them from `tiers` (the plan's, resolved: bench/tiers.py), only the ones it names; one
    without runs device-only whatever the reference says."""
    bc = get_config(name)
    cfg = bc.apply(reference)
    if cfg.scheduler.enable_chunked_prefill:
        cfg = replace(cfg, scheduler=replace(cfg.scheduler, max_num_batched_tokens=max_num_batched_tokens))
    return replace(cfg, tiers=select_tiers(tiers, bc.tiers, name))


def gate_engine_config(name: str, reference: EngineConfig, num_blocks: int, step_tokens: int,
                       chunk: int, tiers: TierConfig | None = None) -> EngineConfig:
    """The engine the correctness gate runs config `name` on: the reference with a pool of `num_blocks`
    (small: the gate set preempts and evicts) and a step budget of `step_tokens` (room to admit the first
    wave at once), then the config's transform; a chunking config gets `chunk` tokens per step, so long
    prompts cross many chunk borders. A tiered config keeps its tiers (`tiers`, as for the measured engine):
    what the small pool evicts goes down to them and wave 2 loads it back."""
    ref = replace(reference, cache=replace(reference.cache, num_blocks=num_blocks, memory_bytes=None),
                  scheduler=replace(reference.scheduler, max_num_batched_tokens=max(step_tokens, chunk)))
    return engine_config(name, ref, chunk, tiers)
