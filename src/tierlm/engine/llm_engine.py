"""LLMEngine: add_request / step / abort. One step = schedule -> execute -> update.

Construction loads the checkpoint, builds the model on `meta` and assigns weights, sizes the KV block
pool from the memory budget (kvcache/spec.py), and wires scheduler, runner and sampler together.
A request with n > 1 becomes n sequences (request_id#i) that share the prompt's cached prefix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tierlm.attention import select_backend
from tierlm.attention.indexer import require_indexer
from tierlm.attention.sparse import build_selector
from tierlm.config import CacheConfig, EngineConfig
from tierlm.core.errors import InvalidParameterError, PromptTooLongError
from tierlm.core.outputs import CompletionOutput, Logprob, RequestOutput
from tierlm.core.registry import dtype_name, get_dtype, get_kv_format
from tierlm.core.request import Request, RequestStatus
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.captured import DecodeGraphs, default_sizes
from tierlm.engine.detokenizer import IncrementalDetokenizer
from tierlm.engine.model_runner import ModelRunner
from tierlm.engine.sampler import Sampler
from tierlm.kvcache import KVCacheManager, KVSpec, KVStorage
from tierlm.kvcache.spill import SpillStore, plan_spill
from tierlm.kvcache.tiers import EntryIdentity, TierController, build_tiers
from tierlm.memory.storage import drop_page_cache
from tierlm.models import build_model
from tierlm.models.loader import load_checkpoint
from tierlm.scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 2 << 30  # 2 GiB of KV on CPU unless told otherwise
DEFAULT_CUDA_KV_FRACTION = 0.5  # of free device memory after weights


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("device 'cuda' requested but CUDA is not available", "use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # fp32 on CPU: without native bf16, fp32 matmuls are faster there (and exact w.r.t. the reference).
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return get_dtype(dtype).torch_dtype


def _config_digest(config) -> str:
    """Short digest of the ModelConfig fields the KV depends on: shapes, RoPE, norms (not the display name
    or the special token ids)."""
    skip = ("model_id", "bos_token_id", "eos_token_ids")
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StepSummary:
    """What the last `step()` computed: decode tokens (one per decoding sequence), prefill tokens (prompt
    chunks and recomputes; a step with both is a mixed step), and context tokens, the KV positions its
    attention read (each scheduled sequence's whole context, new tokens included)."""

    decode_tokens: int = 0
    prefill_tokens: int = 0
    context_tokens: int = 0

    @property
    def kind(self) -> str:
        if self.decode_tokens and self.prefill_tokens:
            return "mixed"
        return "decode" if self.decode_tokens else "prefill"


@dataclass
class _Sequence:
    """Engine-side state of one generated sequence."""
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[list[Logprob]] | None = None


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        cc = config.cache
        compute = dtype_name(self.dtype)
        kv_format = cc.kv_format or compute
        # Chosen before the (slow) load, so a backend that cannot run here fails at once.
        self.attention_backend = select_backend(config.attention_backend, self.device, self.dtype, kv_format)
        t0 = time.perf_counter()
        ckpt = load_checkpoint(config.model)
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.max_model_len = min(config.max_model_len or ckpt.config.max_position_embeddings,
                                 ckpt.config.max_position_embeddings)
        if ckpt.config.sliding_window:
            # Attention here is full-context; within the window that is exactly sliding-window attention.
            self.max_model_len = min(self.max_model_len, ckpt.config.sliding_window)
        packed = None
        if config.quantization != "none":
            from tierlm.models.loader.quantized import load_quantized

            packed = load_quantized(ckpt, config.quantization, config.quant_group)
        self.model = build_model(ckpt.config, ckpt.weights, self.dtype, self.device, self.max_model_len, packed,
                                 config.quant_activations)
        del packed
        if hasattr(self.model, "place_tables"):
            if config.engram_cold_start and config.engram_backend == "mmap":
                for path in ckpt.table_files:
                    drop_page_cache(path)
            self.model.place_tables(config.engram_backend, self.device, config.engram_prefetch,
                                    ckpt.table_files[0] if ckpt.table_files else None)
        self.weights_digest = ckpt.weights_digest
        # what the numbers are computed in: the dtype, and the weight format when quantized (KV keys name it)
        self.compute_key = compute if config.quantization == "none" else (
            f"{compute}+{config.quantization}" + (f"-g{config.quant_group}" if config.quant_group else "")
            + f"/{'fp32' if config.quantization.startswith('fp8') else config.quant_activations}")
        self.model_config_digest = _config_digest(ckpt.config)
        del ckpt
        self.load_seconds = time.perf_counter() - t0

        self.model_max_len = self.max_model_len  # before any cap by the KV pool's size
        # The KV byte budget, kept when the drift guard switches format (fewer blocks of a wider format).
        spec = KVSpec.from_model(self.model_config, kv_format, cc.block_size)
        self.kv_budget_bytes = (cc.num_blocks * spec.page_size_bytes if cc.num_blocks
                                else cc.memory_bytes or self._default_kv_bytes(spec))
        self.candidate_kv_format = kv_format  # what the config asks for
        self.safe_kv_format = compute  # what the drift guard falls back to
        self._backends = {kv_format: self.attention_backend}
        self._candidate_scales = self._static_kv_scales(cc) if get_kv_format(kv_format).static else None
        self.drift_guard = self._build_drift_guard() if config.drift_guard.enabled else None
        self.scheduler: Scheduler | None = None
        self._build_kv(self.safe_kv_format if self.drift_guard is not None and self.drift_guard.tripped else kv_format)
        self.sampler = Sampler(tuple(self.tokenizer.eos_token_ids))
        self._structured = None  # built at the first constrained request (engine/structured.py)
        self.groups: dict[str, _Group] = {}
        self._seq_to_group: dict[str, _Group] = {}
        self._ids = itertools.count()
        # computed_tokens: tokens run through the model (prefix-cache hits are not computed).
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "computed_tokens": 0, "steps": 0}
        self.last_step: StepSummary | None = None  # None until a step computes something

    def _static_kv_scales(self, cc: CacheConfig):
        """A static FP8 format's calibrated scales (quant/calibration.py): a clear error when missing or made
        for another model."""
        from tierlm.quant.calibration import ModelIdentity, default_path, load_scales

        identity = ModelIdentity(self.model_config.model_id, self.weights_digest, self.model_config_digest)
        path = Path(cc.kv_scales_path).expanduser() if cc.kv_scales_path else default_path(identity)
        return load_scales(path, identity, self.model_config.num_layers, self.model_config.num_kv_heads)

    def _build_kv(self, kv_format: str) -> None:
        """The device KV pool in `kv_format` within the KV byte budget, and what hangs on it: the lower tiers,
        the block manager, the runner, the scheduler's manager. Called at construction, and when the drift
        guard switches format (with nothing running)."""
        cc, compute = self.config.cache, dtype_name(self.dtype)
        if kv_format not in self._backends:
            self._backends[kv_format] = select_backend(self.config.attention_backend, self.device, self.dtype, kv_format)
        self.attention_backend = self._backends[kv_format]
        self.kv_format = kv_format
        self.kv_spec = KVSpec.from_model(self.model_config, kv_format, cc.block_size)
        num_blocks = self.kv_spec.num_blocks_for_budget(self.kv_budget_bytes)
        if num_blocks < 1:
            raise InvalidParameterError("the KV memory budget holds no block", "raise the KV cache memory budget")
        sp = self.config.sparse
        self.selector = build_selector(sp, cc.block_size)
        pool, num_spill = num_blocks, 0
        if sp.spill_bytes:  # cold blocks of running sequences spill below the pool (kvcache/spill.py)
            # no staging for a backend that reads the spill store in place (the cpu backend: it is host memory)
            staging = 0 if self.attention_backend.reads_spill_in_place else sp.staging
            pool, num_spill = plan_spill(self.kv_spec.page_size_bytes, num_blocks, cc.block_size, sp.spill_bytes,
                                         staging, self.selector.sink_blocks + self.selector.window_blocks)
        captured = self._captured_decode(num_spill) and pool > 1
        if captured:
            pool -= 1  # the last device block is the pad block: padded rows of a captured step write there
        # One sequence can never hold more KV than the whole pool (and the spill store): cap the context there,
        # and say so now rather than stopping requests early with no word of why.
        self.max_model_len, self.context_limit = self.model_max_len, ""  # context_limit: why it is capped, if it is
        pool_tokens = (pool + num_spill) * cc.block_size
        if pool_tokens < self.max_model_len:
            self.context_limit = f"the KV cache holds {pool_tokens} tokens"
            held = f"{pool} blocks of {cc.block_size}" + (f" + {num_spill} spilled" if num_spill else "")
            log.warning("the KV cache holds %d tokens (%s), less than the context of %d: sequences are capped at %d "
                        "tokens; raise --kv-cache-memory%s for longer ones", pool_tokens, held, self.max_model_len,
                        pool_tokens, " or --sparse-spill" if num_spill else "")
            self.max_model_len = pool_tokens
        # What a block's KV means besides its tokens: which model (name, weight bytes, shape and RoPE/norm
        # settings), the compute dtype, the KV format (static: with its scales), the tenant. KV in a shared
        # lower tier never crosses these. (The device and attention backend change the last bits of K/V, not
        # their meaning: KV moved between them is reused like KV recomputed there.)
        if self.config.sparse.selector == "indexer":
            self._check_indexer()  # before the pool is allocated
        if getattr(self, "spill", None) is not None:
            self.spill.close()  # the drift guard rebuilds the KV side with nothing running
        self.kv_storage = KVStorage(self.kv_spec, num_blocks, self.device, num_spill)
        if self.selector is not None:
            self.selector.add_meta(self.kv_storage)  # before the tiers: their entries carry every per-block part
        if hasattr(self.model, "add_kv_meta"):
            self.model.add_kv_meta(self.kv_storage)  # a V4-mini's Engram conv state, paged with the KV
        self.spill = SpillStore(self.kv_storage, num_spill, pool, sp.spill_dir) if num_spill else None
        self.kv_scales = self._candidate_scales if self.kv_spec.format.static else None
        if self.kv_scales is not None:
            per_layer = self.kv_scales.scales(self.kv_spec.format.scheme().type.max).to(self.device)
            for layer, sc in zip(self.kv_storage.layers, per_layer):
                layer.static_scales = sc.clone()
        extra_keys = (self.model_config.model_id, self.weights_digest, self.model_config_digest, self.compute_key,
                      self._kv_key(kv_format), cc.tenant_salt)
        self.tiers = self._build_tiers(self.config, extra_keys)
        keep = (self.selector.sink_blocks, self.selector.window_blocks) if self.spill is not None else (0, 1)
        self.kv = KVCacheManager(pool, cc.block_size, cc.enable_prefix_caching, cc.hash_seed, extra_keys,
                                 tiers=self.tiers, spill=self.spill, spill_keep=keep)
        if self.scheduler is None:
            self.scheduler = Scheduler(self.config.scheduler, self.kv)
        else:
            self.scheduler.kv = self.kv
        self.runner = ModelRunner(self.model, self.kv_storage, self.attention_backend, self.device, self.selector)
        if captured:
            sizes = self.config.cuda_graph_sizes or default_sizes(self.config.scheduler.max_num_seqs)
            self.runner.graphs = DecodeGraphs(self.runner, sizes, -(-self.max_model_len // cc.block_size),
                                              pad_block=pool, replay="cuda" if self.device.type == "cuda" else "rerun")
        for text in self.config.tiers.pinned_prefixes:
            self.pin_prefix(text)

    def _captured_decode(self, num_spill: int) -> bool:
        """Whether pure-decode steps replay from CUDA graphs (engine/captured.py); captured_decode="on" says why not."""
        mode = self.config.captured_decode
        if mode == "off":
            return False
        why = None
        if not self.attention_backend.capturable:
            why = (f"the {self.attention_backend.name} attention backend cannot be captured "
                   "(use --attention-backend triton)")
        elif num_spill:
            why = "a spill store (--sparse-spill) moves blocks between steps on the host"
        elif self.selector is not None and not getattr(self.selector, "capturable", False):
            why = f"the {self.selector.name} sparse selector picks blocks with host-side decisions"
        elif getattr(self.model, "token_context", None) is not None:
            why = "the model reads token context on the host (Engram)"
        elif self.device.type != "cuda" and mode == "auto":
            why = "there is no CUDA device"
        if why is None:
            return True
        if mode == "on":
            raise InvalidParameterError(f"captured decode cannot run: {why}", "use --enforce-eager")
        if self.device.type == "cuda":
            log.info("decode steps run eager: %s", why)
        return False

    def _kv_key(self, kv_format: str) -> str:
        """The KV format as block hashes, tier entries and the drift guard name it (static: @ its scales)."""
        if kv_format == self.candidate_kv_format and self._candidate_scales is not None:
            return f"{kv_format}@{self._candidate_scales.digest}"
        return kv_format

    def _build_drift_guard(self):
        from tierlm.engine.drift_guard import DriftGuard, ReferenceScorer

        identity = {"model": self.model_config.model_id, "weights": self.weights_digest,
                    "config": self.model_config_digest, "compute": self.compute_key,
                    "kv": self._kv_key(self.candidate_kv_format)}
        scorer = ReferenceScorer(self.model, self.model_config, self.safe_kv_format, self.config.cache.block_size,
                                 self.device, self.dtype, self.config.attention_backend)
        return DriftGuard(self.config.drift_guard, scorer, identity, self.device)

    def _build_tiers(self, config: EngineConfig, extra_keys: tuple) -> TierController | None:
        """The lower KV tiers, or None when none is configured. An entry's identity names everything its KV
        depends on (the same fields as the block hash's extra keys) plus the storage layout, so the codec
        refuses an entry from another model, format or layout even under a matching key."""
        tiers = build_tiers(config.tiers)
        if not tiers:
            return None
        model_id, weights, shape, compute, kv_format, _ = extra_keys
        # A block's shape, not the pool's: engines with other pool sizes share entries.
        layout = ";".join(f"{name}:{str(t.dtype).removeprefix('torch.')}:"
                          f"{'x'.join(str(n) for i, n in enumerate(t.shape) if i != dim)}"
                          + ("" if len(held) == len(self.kv_storage) else f"@{','.join(map(str, held))}")
                          for name, (t, dim, held) in self.kv_storage.part_layout().items())
        identity = EntryIdentity(model=f"{model_id}@{weights}/{shape}/{compute}", kv_format=kv_format,
                                 layout=f"{len(self.kv_storage)} layers;{layout}")
        return TierController(config.tiers, tiers, self.kv_storage, identity)

    def pin_prefix(self, prompt: str | list[int], cache_salt: str | None = None) -> int:
        """Keep this prefix's full blocks cached on the device and in every tier (e.g. a system prompt).
        Blocks not computed yet are pinned when a request computes them. Returns the number of blocks."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.kv.pin_prefix(ids, cache_salt)

    def tier_stats(self) -> dict[str, dict]:
        """Per lower tier: traffic, capacity, health, hit tokens (empty without tiers)."""
        return self.tiers.tier_stats() if self.tiers is not None else {}

    def close(self) -> None:
        """Write what only memory holds (cached device blocks, host-tier entries) to the disk and Redis tiers,
        finish queued tier writes and stop the tier threads and the drift guard's worker. Safe to call twice."""
        if self.drift_guard is not None:
            self.drift_guard.close()
        if self.spill is not None:
            self.spill.close()
        if self.tiers is not None:
            self.tiers.persist([self.kv._ref(b) for b in self.kv.pool.cached.values()])
            self.tiers.close()
        if hasattr(self.model, "close"):
            self.model.close()  # a V4-mini's prefetch threads
        if self._structured is not None:
            self._structured.close()

    def _default_kv_bytes(self, spec: KVSpec) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # Memory torch's caching allocator holds but no tensor uses (e.g. an earlier engine's freed KV
            # cache) is free to this engine too; the driver counts it as used.
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            # No more than every sequence at full context can use: on a large GPU with a small model, half
            # the free memory would be millions of blocks (a Python object each) that no step can reach.
            seqs = self.config.scheduler.max_num_seqs
            most = seqs * spec.blocks_per_sequence(self.max_model_len) * spec.page_size_bytes
            return min(int(free * DEFAULT_CUDA_KV_FRACTION), most)
        return DEFAULT_CPU_KV_BYTES

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, cache_salt: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        taken = [i for i in [request_id, *seq_ids] if i in self.groups or i in self._seq_to_group]
        if taken:  # a group id, or a sequence id ("x#0" of a request "x" with n > 1), already in flight
            raise InvalidParameterError(f"request id {taken[0]!r} is already in use", "use a unique request_id",
                                        param="request_id")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            if any((not isinstance(t, int)) or t < 0 or t >= self.model_config.vocab_size for t in ids):
                raise InvalidParameterError("prompt token ids out of range",
                                            f"use ids in [0, {self.model_config.vocab_size})", param="prompt")
        if not ids:
            raise InvalidParameterError("the prompt is empty", "give at least one token", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len, why=self.context_limit)
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len, params.max_tokens, why=self.context_limit)
        sc = self.config.scheduler
        if not sc.enable_chunked_prefill and len(ids) > sc.max_num_batched_tokens:
            raise InvalidParameterError(
                f"the prompt has {len(ids)} tokens but chunked prefill is off and a step computes at most "
                f"{sc.max_num_batched_tokens}", "enable chunked prefill or raise max_num_batched_tokens", param="prompt")
        max_tokens = self.max_model_len - len(ids) if params.max_tokens is None else params.max_tokens
        guides = [None] * params.n
        if params.structured_outputs is not None:  # compiled before anything is queued: a bad one is a 400
            guides = [self.structured.guide(params.structured_outputs) for _ in range(params.n)]
        group = _Group(request_id, text, ids)
        for i in range(params.n):
            p = replace(params, max_tokens=max_tokens, n=1,
                        seed=None if params.seed is None else params.seed + i)
            seq_id = seq_ids[i]
            req = Request(seq_id, list(ids), p, prompt=text, priority=priority, cache_salt=cache_salt,
                          guide=guides[i])
            detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.stop, p.include_stop_str_in_output)
            if i == 0 and self.drift_guard is not None and self.drift_guard.want():
                req.shadow = []
            group.seqs.append(_Sequence(req, detok, [] if p.logprobs is not None else None))
            self._seq_to_group[seq_id] = group
            self.scheduler.add(req)
        self.groups[request_id] = group
        self.counters["prompt_tokens"] += len(ids)
        return request_id

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits of each continuation, computed the way generation computes them: the
        prompt is prefilled, then every continuation token is fed back as a decode step reading the KV
        cache (so a lossy KV format shows its effect on each position). Returns per pair a [len(cont), vocab]
        fp32 tensor whose row i is the distribution over continuation[i] given prompt + continuation[:i].
        Runs the engine until these requests finish: call it on an engine with nothing else in flight."""
        if self.has_unfinished_requests():
            raise RuntimeError("score() runs its own requests to completion: the engine has others in flight")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        if any(not cont for cont in continuations):
            raise InvalidParameterError("an empty continuation has nothing to score", "give at least one token")
        sinks: list[list[torch.Tensor]] = []
        for prompt, cont in zip(prompts, continuations):
            rid = self.add_request(list(prompt), SamplingParams(temperature=0.0, max_tokens=len(cont), ignore_eos=True))
            req = self.groups[rid].seqs[0].request
            req.forced_token_ids, req.logits_sink, req.shadow = list(cont), [], None
            sinks.append(req.logits_sink)
        while self.has_unfinished_requests():
            self.step()
        return [torch.stack(rows) for rows in sinks]

    @property
    def structured(self):
        """The structured-output compiler and mask worker (built on first use)."""
        if self._structured is None:
            from tierlm.engine.structured import StructuredOutputs

            # Overlap pays where the forward pass leaves the CPU idle (a GPU); on a CPU the worker only competes
            # with the forward pass's threads for the same cores (measured equal or ~5% slower on 2 cores).
            self._structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size,
                                                 overlap=self.device.type == "cuda")
        return self._structured

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for s in group.seqs:
            if not s.request.is_finished:
                self.scheduler.finish(s.request, RequestStatus.FINISHED_ABORTED)
            self._release(s.request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def _check_indexer(self) -> None:
        """The indexer selector needs a model with trained lightning-indexer weights (attention/indexer.py);
        no model family tierlm loads has them yet (the V4-mini family will), so this always explains why."""
        require_indexer(self.model, range(self.model_config.num_layers))
        raise InvalidParameterError(
            f"{self.model_config.model_id} has lightning-indexer weights, but indexer-driven decoding is not "
            "wired into the engine yet", "use --sparse quest")

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.drift_guard is not None:
            self._follow_drift_guard()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.last_step = None
            return []
        decodes = sum(1 for s in sched.scheduled if s.is_decode)
        context = sum(s.request.num_computed_tokens + s.num_new_tokens for s in sched.scheduled)
        self.last_step = StepSummary(decodes, sched.num_batched_tokens - decodes, context)
        t0 = time.perf_counter()
        structured = self._structured
        if structured is not None:  # guided masks are computed on a worker while the forward pass runs
            structured.begin([s.request for s in sched.scheduled])
        try:
            logits, reqs = self.runner.execute(sched)
            allowed = structured.masks(reqs) if structured is not None else None
            sampled = self.sampler(logits, reqs, allowed) if reqs else None
        except BaseException:
            if structured is not None:
                structured.cancel()
            self.scheduler.undo_step(sched)  # nothing of this step is kept: no cached KV, no half-advanced request
            raise
        if not decodes:  # a prefill-only step's speed feeds the tiers' cost model (load vs recompute)
            self.kv.note_prefill(sched.num_batched_tokens, time.perf_counter() - t0)
        self.scheduler.update_after_step(sched)
        toks = []
        if reqs:  # teacher forcing (score) keeps the logits but forces the token
            toks = [req.forced_token_ids[len(req.output_token_ids)] if req.forced_token_ids is not None else tok
                    for req, tok in zip(reqs, sampled.token_ids)]
            self.runner.hand_off(reqs, toks)
        self.counters["steps"] += 1
        self.counters["computed_tokens"] += sched.num_batched_tokens
        touched: dict[str, _Group] = {}
        if reqs:
            if self.drift_guard is not None:
                t_capture = time.perf_counter()
                self._capture_shadow(logits, reqs)
                self.drift_guard.counters["engine_seconds"] += time.perf_counter() - t_capture
            now = time.monotonic()
            for row, (req, tok, lps) in enumerate(zip(reqs, toks, sampled.logprobs)):
                if req.logits_sink is not None:
                    req.logits_sink.append(logits[row].detach().float().cpu())
                group = self._seq_to_group[req.request_id]
                seq = next(s for s in group.seqs if s.request is req)
                self._append_token(seq, tok, lps, now)
                touched[group.request_id] = group
        outputs = [self._make_output(g) for g in touched.values()]
        for g in touched.values():
            if g.finished:
                self.groups.pop(g.request_id, None)
        return outputs

    def _append_token(self, seq: _Sequence, tok: int, lps: list[Logprob] | None, now: float) -> None:
        req, p = seq.request, seq.request.sampling_params
        req.output_token_ids.append(tok)
        self.counters["generation_tokens"] += 1
        if req.first_token_time is None:
            req.first_token_time = now
        if seq.logprobs is not None and lps is not None:
            for lp in lps:
                lp.token = self.tokenizer.id_to_token(lp.token_id)
            seq.logprobs.append(lps)
        stop_str = seq.detok.append(tok)
        n_out = len(req.output_token_ids)
        status = None
        if req.guide is not None and req.forced_token_ids is None:
            if not req.guide.accept(tok):  # never expected: the mask allowed only what the grammar takes
                log.warning("structured outputs: request %s sampled token %d its grammar refuses (%s); stopped",
                            req.request_id, tok, req.guide.error)
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, "grammar_error"
            elif req.guide.done:
                status = RequestStatus.FINISHED_STOPPED  # the grammar is complete: only the end could follow
        if status is None and n_out >= p.min_tokens:
            if stop_str is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
            elif tok in p.stop_token_ids:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok
            elif not p.ignore_eos and tok in self.tokenizer.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
        if status is None and (n_out >= p.max_tokens or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            req.finished_time = now
            self.scheduler.finish(req, status)
            self._release(req)
            if req.shadow is not None:
                t_submit = time.perf_counter()
                self._submit_shadow(req)
                self.drift_guard.counters["engine_seconds"] += time.perf_counter() - t_submit

    # ---- drift guard ---------------------------------------------------------------------------
    def _capture_shadow(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """Keep the top-k log-probabilities of the rows that shadow-scored requests sample from."""
        rows = [i for i, r in enumerate(reqs) if r.shadow is not None]
        if not rows:
            return
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        values, ids = lp.topk(min(self.config.drift_guard.top_k, lp.shape[-1]), dim=-1)
        values, ids = values.cpu(), ids.cpu()
        for j, i in enumerate(rows):
            reqs[i].shadow.append((values[j], ids[j]))

    def _submit_shadow(self, req: Request) -> None:
        from tierlm.engine.drift_guard import ShadowJob

        rows, req.shadow = req.shadow, None
        if len(rows) != len(req.output_token_ids):  # never expected; a mismatched job would score nonsense
            log.warning("drift guard: request %s kept %d rows for %d tokens; not scored", req.request_id,
                        len(rows), len(req.output_token_ids))
            return
        self.drift_guard.submit(ShadowJob(req.request_id, list(req.prompt_token_ids), list(req.output_token_ids),
                                          torch.stack([v for v, _ in rows]), torch.stack([i for _, i in rows])))

    def _follow_drift_guard(self) -> None:
        """Run the KV format the guard wants: the safe one while tripped, else the candidate. A switch waits
        until nothing runs (waiting requests stay waiting meanwhile), then rebuilds the KV pool."""
        want = self.safe_kv_format if self.drift_guard.tripped else self.candidate_kv_format
        if want == self.kv_format:
            self.scheduler.admitting = True
            return
        self.scheduler.admitting = False
        if self.scheduler.running or self.scheduler.loading:
            return
        log.warning("drift guard: switching the KV cache from %s to %s (%d requests waiting)", self.kv_format, want,
                    len(self.scheduler.waiting))
        if self.tiers is not None:
            self.tiers.close()
        self.kv_storage = self.kv = self.runner = None  # the old pool is freed before the new one is allocated
        self._build_kv(want)
        self.scheduler.admitting = True
        for req in [r for r in self.scheduler.waiting if r.num_tokens >= self.max_model_len]:
            log.warning("drift guard: request %s (%d tokens) no longer fits the %s KV pool; aborted", req.request_id,
                        req.num_tokens, want)
            group = self._seq_to_group.get(req.request_id)
            self.abort_request(group.request_id if group is not None else req.request_id)

    def rearm_drift_guard(self) -> bool:
        """Clear a drift-guard trip: new requests use the candidate KV format again (after the running ones
        drain). Returns whether it was tripped. Call on the engine's thread (AsyncEngine.rearm_drift_guard)."""
        if self.drift_guard is None:
            raise InvalidParameterError("the drift guard is off", "enable it (--drift-guard FRACTION) first")
        return self.drift_guard.rearm()

    def _release(self, req: Request) -> None:
        self.sampler.forget(req.request_id)
        self._seq_to_group.pop(req.request_id, None)

    def _make_output(self, g: _Group) -> RequestOutput:
        outs = []
        for i, s in enumerate(g.seqs):
            r = s.request
            done = r.is_finished
            outs.append(CompletionOutput(
                index=i, text=s.detok.visible_text(done), token_ids=list(r.output_token_ids),
                finish_reason=r.status.value if done else None, stop_reason=r.stop_reason,
                logprobs=s.logprobs))
        first = g.seqs[0].request
        metrics = {"arrival_time": first.arrival_time}
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        if g.finished:
            metrics["finished_time"] = max(s.request.finished_time or 0.0 for s in g.seqs)
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, outs, g.finished,
                             num_cached_tokens=max(first.num_cached_tokens, 0),
                             cached_tokens_by_tier=dict(first.cached_tokens_by_tier), metrics=metrics)
