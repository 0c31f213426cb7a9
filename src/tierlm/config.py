"""Frozen configuration dataclasses. Validation raises InvalidParameterError naming the fix."""
from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.core.errors import InvalidParameterError
from tierlm.core.registry import (DTYPE_CHOICES, QUANT_ACTIVATIONS, QUANTIZATION_CHOICES, architecture_names,
                                  get_kv_format, implemented_kv_formats)


ENGRAM_TABLE_BACKENDS = ("device", "host", "mmap")
# when a V4-mini's Engram rows are gathered: "ahead" (the next step's decode tokens handed over as soon as they are
# sampled, the rest at step layout), "step" (every token at step layout), "off" (in the layer, synchronously), "auto"
# (ahead on CUDA; on a CPU, where the prefetch worker takes cores from the forward pass, only for steps of at most
# models.v4mini.CPU_PREFETCH_TOKENS tokens, the rest in the layer)
ENGRAM_PREFETCH_MODES = ("auto", "ahead", "step", "off")
ENGRAM_STATE = "engram"  # the KV block-metadata name of the Engram conv values (models/v4mini.py, kvcache/spec.py)


@dataclass(frozen=True)
class EngramConfig:
    """Conditional memory (Engram, REFERENCE.md section 4) in a V4-mini model: which layers read hashed N-gram
    rows, and the shape of each layer's table (tierlm.memory.hashing.NGramHasher with these fields; every Engram
    layer has its own table, hashed with seed `seed + layer`)."""

    layers: tuple[int, ...]
    row_dim: int = 32  # values per table row (one row per N-gram order and hash head)
    rows_per_head: int = 4093  # each head's table is the largest distinct prime <= this
    orders: tuple[int, ...] = (2, 3)
    heads: int = 8
    seed: int = 0
    conv: bool = True  # the causal depthwise conv over the gated values (kernel 4, dilation = max order)
    conv_kernel: int = 4
    num_ids: int = 0  # normalized token ids (the compression map's range; 0: the vocabulary, no compression)

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise InvalidParameterError(f"Engram layers {list(self.layers)} must be distinct layer indices >= 0",
                                        "list the decoder layers that read memory, e.g. engram.layers: [1]")
        if self.row_dim < 1 or self.heads < 1 or self.rows_per_head < 2 or not self.orders or min(self.orders) < 1:
            raise InvalidParameterError("Engram needs row_dim >= 1, heads >= 1, rows_per_head >= 2 and orders >= 1",
                                        "use the defaults: row_dim 32, 8 heads, orders [2, 3]")
        if self.conv and self.conv_kernel < 2:
            raise InvalidParameterError(f"Engram conv_kernel {self.conv_kernel} < 2", "use 4, or conv: false")

    @property
    def slots(self) -> int:
        return len(self.orders) * self.heads

    @property
    def history(self) -> int:
        """Earlier token ids one position's N-grams read."""
        return max(self.orders) - 1

    @property
    def taps(self) -> tuple[int, ...]:
        """How far back the conv reads earlier gated values (dilation = max order): e.g. (3, 6, 9)."""
        return tuple(max(self.orders) * k for k in range(1, self.conv_kernel)) if self.conv else ()


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer (Llama family). Built by the loader from GGUF or config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    # or {"rope_type": "freq_factors", "factors": [head_dim / 2 divisors]} (a GGUF's rope_freqs; see layers.rope_inv_freq)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_id: str = "unknown"
    engram: EngramConfig | None = None  # V4-mini: conditional memory at some layers
    attention_type: str = "gqa"  # models/v4mini.py ATTENTION_TYPES: the attention a V4-mini layer runs

    def __post_init__(self) -> None:
        if self.engram is not None and max(self.engram.layers) >= self.num_layers:
            raise InvalidParameterError(f"Engram layer {max(self.engram.layers)} does not exist in a "
                                        f"{self.num_layers}-layer model", "list layers below num_hidden_layers")
        if self.architecture not in architecture_names():
            raise InvalidParameterError(
                f"unsupported architecture {self.architecture!r}",
                f"tierlm supports {', '.join(architecture_names())}",
            )
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
                "check the model's config.json",
            )

    @property
    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = self.vocab_size * h
        engram = 0
        if self.engram is not None:  # per Engram layer: W_K, W_V, two norms, the conv
            e = self.engram
            engram = len(e.layers) * (2 * e.slots * e.row_dim * h + 2 * h + (h * e.conv_kernel if e.conv else 0))
        return L * per_layer + emb * (1 if self.tie_word_embeddings else 2) + h + engram


@dataclass(frozen=True)
class CacheConfig:
    """The device KV block pool. Size it by `num_blocks` or by `memory_bytes` (num_blocks wins)."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int | None = None
    kv_format: str | None = None  # None: the model dtype
    kv_scales_path: str | None = None  # static FP8 formats: calibration file (None: the default location)
    enable_prefix_caching: bool = True
    hash_seed: int = 0
    tenant_salt: str = ""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError(f"block_size {self.block_size} is not a power of two", "use 8, 16 or 32")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidParameterError(f"num_blocks {self.num_blocks} < 1", "give at least one block")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise InvalidParameterError(f"memory_bytes {self.memory_bytes} < 1", "give a positive KV memory budget")
        if self.kv_format is not None and not get_kv_format(self.kv_format).implemented:
            raise InvalidParameterError(f"KV format {self.kv_format!r} is planned but not implemented yet",
                                        f"use one of {', '.join(implemented_kv_formats())}")


GiB = 1 << 30
TIER_POLICIES = ("lru", "s3fifo")
WRITE_POLICIES = ("write_back", "write_through")
PREEMPTION_MODES = ("auto", "recompute", "offload")


@dataclass(frozen=True)
class TierConfig:
    """The KV tiers below the device pool (kvcache/tiers/): host memory (T1), a disk directory (T2), a
    Redis-compatible server (T3). A tier is on when it is given a size (host) or a location (disk, redis).

    Movement: `write_back` demotes a cached block to the first lower tier when the device pool evicts it, and
    each tier demotes its own evictions to the next one; `write_through` stores every block in every tier as
    soon as its KV is computed. Disk and Redis admit a block only after `admit_after_hits` prefix hits.
    A step waits for at most `load_step_budget_bytes` of loads (larger loads run while other requests decode)
    and no load longer than `load_timeout_s` (then it recomputes). `preemption_mode` picks what happens to a
    preempted sequence's KV (see the scheduler's opening paragraph)."""

    host_memory_bytes: int = 0
    disk_dir: str | None = None
    disk_bytes: int = 20 * GiB
    redis_url: str | None = None
    redis_bytes: int = 4 * GiB
    redis_namespace: str = "tierlm:kv:"  # key prefix on the server (engines that share it share entries)
    eviction_policy: str = "lru"  # "lru" | "s3fifo", inside every lower tier
    write_policy: str = "write_back"  # "write_back" | "write_through"
    admit_after_hits: int = 0  # disk and Redis store a block only once it has been hit this many times
    load_step_budget_bytes: int = 256 << 20
    load_timeout_s: float = 5.0
    redis_timeout_s: float = 0.5  # socket timeout of every Redis call; a timeout marks the tier unhealthy
    preemption_mode: str = "auto"  # "auto" | "recompute" | "offload"
    pinned_prefixes: tuple[str, ...] = ()  # prompt texts whose full blocks are never evicted (device and tiers)

    def __post_init__(self) -> None:
        if self.host_memory_bytes < 0:
            raise InvalidParameterError(f"host cache memory {self.host_memory_bytes} < 0", "give a size like 4GiB, or 0")
        if self.disk_bytes < 1:
            raise InvalidParameterError(f"disk cache size {self.disk_bytes} < 1", "give a size like 20GiB")
        if self.redis_bytes < 1:
            raise InvalidParameterError(f"Redis cache size {self.redis_bytes} < 1", "give a size like 4GiB")
        if self.eviction_policy not in TIER_POLICIES:
            raise InvalidParameterError(f"unknown tier eviction policy {self.eviction_policy!r}",
                                        f"use one of {', '.join(TIER_POLICIES)}")
        if self.write_policy not in WRITE_POLICIES:
            raise InvalidParameterError(f"unknown tier write policy {self.write_policy!r}",
                                        f"use one of {', '.join(WRITE_POLICIES)}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise InvalidParameterError(f"unknown preemption mode {self.preemption_mode!r}",
                                        f"use one of {', '.join(PREEMPTION_MODES)}")
        if self.admit_after_hits < 0:
            raise InvalidParameterError(f"admit_after_hits {self.admit_after_hits} < 0", "use 0 (admit every block) or more")
        if self.load_step_budget_bytes < 0 or self.load_timeout_s <= 0 or self.redis_timeout_s <= 0:
            raise InvalidParameterError("tier load budget and timeouts must be positive", "check the tier flags")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidParameterError(f"Redis URL {self.redis_url!r} is not a redis:// URL",
                                        "use redis://HOST:PORT[/DB] (Redis or Valkey)")

    @property
    def enabled(self) -> bool:
        return bool(self.host_memory_bytes or self.disk_dir or self.redis_url)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunks + decodes)
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidParameterError(f"max_num_seqs {self.max_num_seqs} < 1", "use at least 1")
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError(f"max_num_batched_tokens {self.max_num_batched_tokens} < 1", "use at least 1")
        if self.policy not in ("fcfs", "priority"):
            raise InvalidParameterError(f"unknown scheduling policy {self.policy!r}", "use 'fcfs' or 'priority'")


@dataclass(frozen=True)
class SparseConfig:
    """Sparse decoding (attention/sparse.py): which KV blocks a decode step reads. `selector` "dense" reads all;
    "quest" reads the first `sink_tokens`, the last `window_tokens` and the blocks between whose per-block key
    bounds score best against the query, `budget_tokens` in all (a context within it is read whole: dense).
    The first `dense_layers` layers and every prefill chunk stay dense.

    `spill_bytes` > 0 lets running sequences spill their cold blocks below the device pool (kvcache/spill.py),
    so a context may exceed it: that many bytes of host memory, or of a file in `spill_dir` when given;
    `staging_tokens` of the device budget (0: twice the sparse budget) hold, per layer, the spilled blocks a
    decode step picks."""

    selector: str = "dense"  # "dense" | "quest" | "index" (FP8 index-key scan) | "indexer" (trained indexer weights)
    budget_tokens: int = 1024
    sink_tokens: int = 16
    window_tokens: int = 64
    dense_layers: int = 2
    spill_bytes: int = 0
    spill_dir: str | None = None
    staging_tokens: int = 0

    def __post_init__(self) -> None:
        if self.selector not in SPARSE_SELECTORS:
            raise InvalidParameterError(f"unknown sparse selector {self.selector!r}",
                                        f"use one of {', '.join(SPARSE_SELECTORS)}")
        if min(self.budget_tokens, self.window_tokens) < 1 or min(self.sink_tokens, self.dense_layers) < 0:
            raise InvalidParameterError("sparse budget and window must be >= 1, sink and dense layers >= 0",
                                        "use positive sizes")
        if self.selector != "dense" and self.budget_tokens < self.sink_tokens + self.window_tokens:
            raise InvalidParameterError(
                f"sparse budget {self.budget_tokens} tokens is below sink {self.sink_tokens} + window "
                f"{self.window_tokens}", "raise --sparse-budget or lower --sparse-sink / --sparse-window")

        if self.spill_bytes < 0 or self.staging_tokens < 0:
            raise InvalidParameterError("sparse spill size and staging tokens must be >= 0", "use 0 (off / auto) or more")
        if self.spill_bytes and self.selector not in ("quest", "index"):
            raise InvalidParameterError(f"spilling KV blocks needs a sparse selector that picks blocks, not "
                                        f"{self.selector!r}", "add --sparse quest, or drop --sparse-spill")
        if self.spill_dir and not self.spill_bytes:
            raise InvalidParameterError("a spill directory without a spill size", "add --sparse-spill SIZE")

    @property
    def enabled(self) -> bool:
        return self.selector != "dense"

    @property
    def staging(self) -> int:
        """Staging tokens: as configured, else twice the budget."""
        return self.staging_tokens or 2 * self.budget_tokens


SPARSE_SELECTORS = ("dense", "quest", "index", "indexer")


@dataclass(frozen=True)
class DriftGuardConfig:
    """Runtime rollback of a lossy KV format (engine/drift_guard.py). A share `fraction` of finished requests
    is shadow-scored off the hot path: the candidate's top-k log-probabilities, kept while it generated,
    against a teacher-forced reference forward over the same tokens in the safe format (the compute dtype).
    When the rolling window of the last `window_tokens` scored tokens (decided from `min_tokens` on) has a
    mean KL above `max_kl_mean` or a top-1 agreement below `min_top1_agreement`, new requests run in the safe
    format until re-armed; the trip is remembered in `state_path` (default: the user cache dir) across restarts.

    Defaults: the drift check's offline limits (top-1 0.99, KL 0.01) judge a format before it ships; these
    judge a deployed one on live text, where one disagreement in ten or a tenth of a nat per token on average
    is not rounding any more (healthy FP8 on the default model: top-1 ~0.95, KL ~0.005)."""

    fraction: float = 0.0  # 0: off
    max_kl_mean: float = 0.1
    min_top1_agreement: float = 0.9
    window_tokens: int = 1024
    min_tokens: int = 256
    top_k: int = 32  # candidate log-probs kept per token (KL is computed over these and the rest as one bucket)
    max_pending: int = 8  # requests waiting for the reference; more are dropped (counted), never block the engine
    max_seq_tokens: int = 4096  # longer requests are not scored (the reference forward's KV lives apart)
    state_path: str | None = None
    rearm: bool = False  # forget a remembered trip at start

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise InvalidParameterError(f"drift guard fraction {self.fraction} is not in [0, 1]",
                                        "give the share of finished requests to shadow-score, e.g. 0.05")
        if self.max_kl_mean < 0 or not 0.0 <= self.min_top1_agreement <= 1.0:
            raise InvalidParameterError("drift guard limits out of range",
                                        "use max_kl_mean >= 0 and min_top1_agreement in [0, 1]")
        if min(self.window_tokens, self.min_tokens, self.top_k, self.max_pending, self.max_seq_tokens) < 1:
            raise InvalidParameterError("drift guard window, min_tokens, top_k, max_pending and max_seq_tokens "
                                        "must be >= 1", "use positive sizes")
        if self.min_tokens > self.window_tokens:
            raise InvalidParameterError(f"drift guard min_tokens {self.min_tokens} > window {self.window_tokens}",
                                        "use a window at least as large as min_tokens")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None or "default": the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # "auto" | "fp32" | "bf16"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    max_model_len: int | None = None  # None: the model's context
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    attention_backend: str = "auto"  # "auto" or a name in tierlm.attention.backend.BACKENDS (checked before the load)
    drift_guard: DriftGuardConfig = field(default_factory=DriftGuardConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    # weight format: none | q4_0 | q4_1 | q8_0 | int4 | int8 | fp8 | fp8_ue8m0 (quant.weights) | gguf (as stored)
    quantization: str = "none"
    quant_group: int | None = None  # int4's group (32 / 64 / 128; default 32)
    # how quantized linears take their input: "int16" (rounded per 32 inputs: near-exact, fast) | "int8" (the
    # fastest, llama.cpp's scheme, measurably lossy) | "fp32" (exact up to summation order, compute-bound)
    quant_activations: str = "int16"
    # where a V4-mini's Engram tables are served from: "device" (a copy on the compute device), "host" (host
    # memory, pinned on CUDA), "mmap" (the checkpoint file, mapped in place: tables larger than memory)
    engram_backend: str = "device"
    engram_prefetch: str = "auto"  # ENGRAM_PREFETCH_MODES
    # drop the mmap'ed table file's pages from the OS page cache at start: a cold start, every first row read goes
    # to the disk (the bench's engram-mmap-cold measures where prefetch stops hiding that latency)
    engram_cold_start: bool = False
    # decode steps replayed from CUDA graphs (engine/captured.py): "auto" (on CUDA with a capturable attention
    # backend), "off" (--enforce-eager), "on" (required; without a GPU the static-buffer path runs eagerly: tests)
    captured_decode: str = "auto"
    cuda_graph_sizes: tuple[int, ...] = ()  # batch sizes to capture; () = captured.default_sizes(max_num_seqs)

    def __post_init__(self) -> None:
        if self.captured_decode not in ("auto", "on", "off"):
            raise InvalidParameterError(f"unknown captured_decode {self.captured_decode!r}", "use auto, on or off")
        if any(s < 1 for s in self.cuda_graph_sizes):
            raise InvalidParameterError(f"--cuda-graph-sizes {list(self.cuda_graph_sizes)} must be positive",
                                        "give batch sizes such as 1 2 4 8 16")
        if self.engram_backend not in ENGRAM_TABLE_BACKENDS:
            raise InvalidParameterError(f"unknown Engram table backend {self.engram_backend!r}",
                                        f"use one of {', '.join(ENGRAM_TABLE_BACKENDS)}")
        if self.engram_prefetch not in ENGRAM_PREFETCH_MODES:
            raise InvalidParameterError(f"unknown Engram prefetch mode {self.engram_prefetch!r}",
                                        f"use one of {', '.join(ENGRAM_PREFETCH_MODES)}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise InvalidParameterError(f"unknown quantization {self.quantization!r}",
                                        f"use one of {', '.join(QUANTIZATION_CHOICES)}")
        if self.quant_activations not in QUANT_ACTIVATIONS:
            raise InvalidParameterError(f"unknown quantized-activation mode {self.quant_activations!r}",
                                        "use int16, int8 or fp32")
        if self.quant_group is not None and self.quantization != "int4":
            raise InvalidParameterError("--quant-group applies to --quantization int4 only",
                                        "drop --quant-group, or use --quantization int4")
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidParameterError(f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPE_CHOICES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidParameterError(f"unknown device {self.device!r}", "use auto, cpu or cuda")
        if self.tiers.enabled and not self.cache.enable_prefix_caching:
            raise InvalidParameterError("KV tiers need prefix caching: their entries are found by block hash",
                                        "enable prefix caching or drop the tier flags")
