"""BenchPlan: what one `tierlm bench` will do, and `preflight`, which rejects bad input before any work.

Preflight loads only the tokenizer and model shape (memory-mapped, no engine), then checks, in order:
config and workload names and knobs, every workload's longest sequence against the context and the
KV pool, each peer server URL (a GET of /v1/models), and that the output directory and the JSON path
are writable. Each failure is one InvalidParameterError line naming the problem and the fix.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from tierlm.bench.arrivals import ArrivalPlan
from tierlm.bench.configs import BASELINE, config_tiers, get_config
from tierlm.bench.metrics import SLO
from tierlm.bench.phases import PhaseShapes
from tierlm.bench.workloads import Workload, build_workload, parse_spec
from tierlm.config import TierConfig
from tierlm.core.errors import InvalidParameterError


@dataclass
class BenchPlan:
    configs: list[str]
    workloads: list[str]
    concurrencies: list[int]
    rate: float | None = None
    burstiness: float = 1.0
    reps: int = 3
    warmup: int = 2
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    usd_per_hour: float | None = None
    memory_budget: int = 8 << 30
    gate_prompts: int = 6  # chat prompts in the gate set
    gate_tokens: int = 32
    gate_long_len: int = 640  # tokens of the gate's long prompts (0: chat prompts only)
    peer: bool = True
    phases: PhaseShapes = field(default_factory=PhaseShapes)
    peer_urls: list[str] = field(default_factory=list)
    peer_model: str | None = None
    peer_api_key: str | None = None
    out_dir: Path = Path("bench-out")
    json_path: Path | None = None
    plots: bool = True
    quick: bool = False
    # engine
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    kv_memory: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # lower KV tiers, for the configs that use them: the user's tier flags (args.add_tier_args); a location
    # or size left unset takes the bench's default for the run (bench/tiers.py)
    tiers: TierConfig = field(default_factory=TierConfig)

    @property
    def needed_tiers(self) -> tuple[str, ...]:
        """The lower tiers the selected configs run with ("host", "disk", "redis")."""
        return config_tiers(self.configs)

    def arrival_plans(self) -> list[ArrivalPlan]:
        if self.rate is not None:
            cap = self.concurrencies[0] if len(self.concurrencies) == 1 else None
            return [ArrivalPlan(concurrency=cap, rate=self.rate, burstiness=self.burstiness, seed=self.seed)]
        return [ArrivalPlan(concurrency=c, seed=self.seed) for c in self.concurrencies]

    def describe(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()
               if k not in ("out_dir", "json_path", "plots", "peer_api_key", "tiers")}
        if self.needed_tiers:  # the flags as given (defaults resolved per run: Environment.tiers)
            from tierlm.bench.tiers import redacted

            out["tiers"] = dataclasses.asdict(self.tiers) | {"redis_url": redacted(self.tiers.redis_url)}
        return out


@dataclass
class Preflight:
    tokenizer: object
    model_config: object
    context: int
    workloads: list[Workload]
    server_models: dict[str, list[str]]


def _check_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tierlm-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InvalidParameterError(f"cannot write the {what} {path} ({e.strerror or e})",
                                    "choose a writable path") from None


def preflight(plan: BenchPlan) -> Preflight:
    plan.configs = list(dict.fromkeys(plan.configs))
    for name in plan.configs:
        get_config(name)
    if BASELINE not in plan.configs:
        plan.configs.insert(0, BASELINE)
    else:  # the reference runs first: the gate and the comparisons need it
        plan.configs.remove(BASELINE)
        plan.configs.insert(0, BASELINE)
    for spec in plan.workloads:
        parse_spec(spec)
    plan.arrival_plans()  # validates concurrency / rate / burstiness
    if plan.reps < 1:
        raise InvalidParameterError(f"reps {plan.reps} < 1", "use --reps 1 or more")
    if plan.warmup < 0 or plan.gate_prompts < 0 or plan.gate_tokens < 1 or plan.gate_long_len < 0:
        raise InvalidParameterError("warm-up, gate prompts, gate tokens or gate prompt length out of range",
                                    "use --warmup >= 0, --gate-prompts >= 0, --gate-tokens >= 1, --gate-long-len >= 0")
    if not plan.gate_prompts and not plan.gate_long_len:
        raise InvalidParameterError("the correctness gate has no prompts",
                                    "keep --gate-prompts or --gate-long-len above 0")
    if 0 < plan.gate_long_len < 16:
        raise InvalidParameterError(f"--gate-long-len {plan.gate_long_len} is too short to split into the gate's "
                                    "shared and own passages", "use 0 (no long prompts) or at least 16")
    if plan.usd_per_hour is not None and plan.usd_per_hour < 0:
        raise InvalidParameterError(f"--usd-per-hour {plan.usd_per_hour} < 0", "give the machine's price per hour")
    if plan.memory_budget < 1 or plan.kv_memory < 1:
        raise InvalidParameterError("memory budgets must be positive", "e.g. --memory-budget 8GiB")
    ph = plan.phases
    if plan.peer and (not ph.prefill_lens or min(ph.prefill_lens) < 1 or ph.prompt_len < 1 or ph.new_tokens < 2
                      or not ph.batches or min(ph.batches) < 1 or ph.reps < 1):
        raise InvalidParameterError("peer phase shapes out of range",
                                    "use prefill/prompt lengths >= 1, new tokens >= 2, batches >= 1")
    # output paths, before anything slow
    _check_writable_dir(plan.out_dir, "output directory")
    if plan.json_path is not None:
        _check_writable_dir(plan.json_path.parent if str(plan.json_path.parent) else Path("."), "JSON directory")
        if plan.json_path.is_dir():
            raise InvalidParameterError(f"--json {plan.json_path} is a directory", "give a file path")

    if plan.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidParameterError("--device cuda but CUDA is not available", "use --device cpu")
    elif plan.device != "cpu":
        raise InvalidParameterError(f"unknown device {plan.device!r}", "use auto, cpu or cuda")

    if plan.needed_tiers:  # a disk directory to write, a Redis server to reach or start
        from tierlm.bench.tiers import preflight_tiers

        preflight_tiers(plan, plan.needed_tiers)

    from tierlm.bench.http_driver import check_server

    servers = {url: check_server(url, api_key=plan.peer_api_key) for url in plan.peer_urls}

    from tierlm.kvcache.spec import KVSpec
    from tierlm.models.loader import load_checkpoint

    ckpt = load_checkpoint(plan.model)
    cfg, tok = ckpt.config, ckpt.tokenizer
    context = min(plan.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    workloads = [build_workload(spec, tok, plan.seed) for spec in plan.workloads]
    spec = KVSpec.from_model(cfg, "fp32", 16)  # worst case among today's formats
    kv_tokens = spec.num_blocks_for_budget(plan.kv_memory) * spec.block_size
    for w in workloads:
        if w.max_seq_len > context:
            raise InvalidParameterError(
                f"workload {w.spec} needs {w.max_seq_len} tokens (input + output) but the context is {context}",
                "shrink its length knobs or raise --max-model-len")
        if w.max_seq_len > kv_tokens:
            raise InvalidParameterError(
                f"workload {w.spec} needs {w.max_seq_len} tokens of KV but --kv-cache-memory holds {kv_tokens}",
                "raise --kv-cache-memory or shrink the workload")
    if plan.gate_long_len + plan.gate_tokens > min(context, kv_tokens):
        raise InvalidParameterError(f"gate prompts of {plan.gate_long_len} tokens plus {plan.gate_tokens} new do not "
                                    f"fit the context of {min(context, kv_tokens)}", "lower --gate-long-len")
    if plan.peer and (max(ph.prefill_lens) + 1 > context or ph.prompt_len + ph.new_tokens > context):
        raise InvalidParameterError(f"peer phase shapes exceed the context of {context} tokens",
                                    "lower --peer-prefill-len / --peer-new-tokens")
    del ckpt
    return Preflight(tok, cfg, context, workloads, servers)
