"""`tierlm train`: pre-training of small Llama and V4-mini models on offline corpora, single-process or data-parallel
under torchrun (torch.distributed: gloo on CPU, NCCL on CUDA; DistributedDataParallel averages the gradients).

Output directory:
    run.json           the config and its digest (a resume with another config is refused)
    prepared/          tokenizer.json (+ config), the token streams (train.npz, val.npz), the token map
    checkpoints/       step-N.pt: model, optimizer, step (the newest `keep`; a killed run resumes from the last)
    log.jsonl          one record per step (loss, lr, tokens, stage, competence) and per evaluation (val loss)
    loss.png           training and validation loss against tokens, stage boundaries marked
    model/             the trained model as a checkpoint every tierlm command loads (`tierlm serve --model DIR`)

A step's batch depends on (seed, step) only and the optimizer state is saved whole, so a resumed run continues
the loss curve it would have drawn uninterrupted (tested by killing a run).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tierlm.config import EngramConfig, ModelConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.models.dense import dense_forward
from tierlm.train.config import TrainConfig
from tierlm.train.curriculum import Curriculum, validation_batches
from tierlm.train.data import Stream, load_tokenizer, read_corpora, tokenize_corpora, training_texts


# ---- distributed ---------------------------------------------------------------------------------------------
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if self.world > 1:
            import torch.distributed as dist

            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = torch.device("cuda", local)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        elif torch.cuda.is_available():
            self.device = torch.device("cuda")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: torch.Tensor) -> float:
        if self.world > 1:
            import torch.distributed as dist

            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world
        return float(value.detach())

    def close(self) -> None:
        """Tear the process group down while the interpreter is whole. DDP's reducer sits in reference cycles that
        hold the group; left to interpreter exit, gloo's threads can meet a half-finalized Python and abort the
        process (seen as SIGABRT on one rank of a loaded machine), so the cycles are collected first."""
        if self.world > 1:
            import gc

            import torch.distributed as dist

            gc.collect()
            dist.destroy_process_group()


# ---- data preparation (rank 0 writes, the others read) --------------------------------------------------------
def _save_streams(path: Path, streams: dict[str, Stream]) -> None:
    arrays = {}
    for name, s in streams.items():
        arrays[f"{name}/tokens"], arrays[f"{name}/starts"], arrays[f"{name}/scores"] = s.tokens, s.starts, s.scores
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_streams(path: Path) -> dict[str, Stream]:
    with np.load(path) as z:
        names = sorted({k.rsplit("/", 1)[0] for k in z.files})
        return {n: Stream(z[f"{n}/tokens"], z[f"{n}/starts"], z[f"{n}/scores"]) for n in names}


def prepare(cfg: TrainConfig, out: Path, dist: Dist):
    """(tokenizer, training streams, validation streams, token map or None), built once into out/prepared."""
    from tierlm.models.loader.tokenizer import Tokenizer

    prep = out / "prepared"
    done = prep / "done"
    if dist.main and not done.exists():
        prep.mkdir(parents=True, exist_ok=True)
        corpora = read_corpora(cfg.data)
        tokenizer = load_tokenizer(cfg.tokenizer, training_texts(cfg.data, corpora) if cfg.tokenizer.kind == "bpe" else [])
        train, val = tokenize_corpora(cfg.data, corpora, tokenizer, cfg.curriculum.difficulty, cfg.seed,
                                      cfg.curriculum.reference_model)
        tokenizer.save(prep)
        _save_streams(prep / "train.npz", train)
        _save_streams(prep / "val.npz", val)
        engram = cfg.model.engram or {}
        if engram.get("compress", True) and cfg.model.family == "v4mini":
            from tierlm.memory.hashing import compression_map, save_map

            save_map(prep / "engram_map.json", compression_map(tokenizer))
        done.write_text("ok\n")
    dist.barrier()
    tokenizer = Tokenizer.from_file(prep / "tokenizer.json", prep / "tokenizer_config.json")
    token_map = None
    if (prep / "engram_map.json").exists():
        from tierlm.memory.hashing import load_map

        token_map = load_map(prep / "engram_map.json", tokenizer.vocab_size)
    return tokenizer, _load_streams(prep / "train.npz"), _load_streams(prep / "val.npz"), token_map


# ---- the model -----------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig, tokenizer, token_map: torch.Tensor | None, name: str) -> ModelConfig:
    m = cfg.model
    engram = None
    if m.engram:
        fields = {k: v for k, v in m.engram.items() if k != "compress"}
        unknown = sorted(set(fields) - set(EngramConfig.__dataclass_fields__) - {"num_ids"})
        if unknown:
            raise InvalidParameterError(f"unknown key(s) in model.engram: {', '.join(unknown)}",
                                        f"use only {', '.join(EngramConfig.__dataclass_fields__)} and compress")
        fields["layers"] = tuple(fields.get("layers", ()))
        if "orders" in fields:
            fields["orders"] = tuple(fields["orders"])
        fields["num_ids"] = int(token_map.max()) + 1 if token_map is not None else 0
        engram = EngramConfig(**fields)
    eos = tuple(tokenizer.eos_token_ids)
    return ModelConfig(architecture=m.family, vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, head_dim=m.head_dim or m.hidden_size // m.num_heads,
                       max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
                       tie_word_embeddings=m.tie_word_embeddings, engram=engram,
                       bos_token_id=tokenizer.bos_token_id, eos_token_ids=eos, model_id=name)


def build_model(mc: ModelConfig, token_map: torch.Tensor | None, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialized model: linears and embeddings N(0, 0.02) (the residual outputs o_proj and down_proj
    scaled by 1/sqrt(2 layers)), norms 1, Engram tables N(0, 1), Engram value projections and convs 0: a new memory
    starts silent and opens as W_V learns (with W_V ~ N(0, 0.02), 256 unit-variance table values put noise of std
    ~0.3 on a residual stream of std 0.02 at step 0, which cost 0.1-0.2 nats of validation loss in
    docs/experiments.md's first runs)."""
    from tierlm.models.registry import model_class

    torch.manual_seed(seed)
    model = model_class(mc.architecture)(mc)
    model.init_rope(device)
    for name, p in model.named_parameters():
        if name.startswith("engram_tables."):
            nn.init.normal_(p, std=1.0)
        elif name.endswith((".conv", ".w_v.weight")):
            nn.init.zeros_(p)
        elif p.dim() == 1:
            nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * mc.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            nn.init.normal_(p, std=std)
    if token_map is not None:
        model.token_map = token_map.clone()
    return model.to(device)


class LMLoss(nn.Module):
    """Mean next-token cross-entropy of a batch of windows [B, T + 1] (what DistributedDataParallel wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        ids, targets = windows[:, :-1], windows[:, 1:]
        logits = self.model.compute_logits(dense_forward(self.model, ids))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW in three groups: matrices with weight decay, vectors without, and the Engram tables on their own
    (Adam at engram_lr, no weight decay)."""
    decay, plain, tables = [], [], []
    for name, p in model.named_parameters():
        (tables if name.startswith("engram_tables.") else decay if p.dim() >= 2 else plain).append(p)
    o = cfg.optim
    groups = [{"params": decay, "lr": o.lr, "weight_decay": o.weight_decay, "base_lr": o.lr},
              {"params": plain, "lr": o.lr, "weight_decay": 0.0, "base_lr": o.lr}]
    if tables:
        groups.append({"params": tables, "lr": o.engram_lr, "weight_decay": 0.0, "base_lr": o.engram_lr,
                       "name": "engram"})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[np.ndarray], device: torch.device) -> float:
    loss = LMLoss(model)
    was = model.training
    model.eval()
    vals = [float(loss(torch.from_numpy(b).to(device))) for b in batches]
    model.train(was)
    return float(np.mean(vals))


# ---- checkpoints -----------------------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def save_state(out: Path, step: int, model: nn.Module, opt, digest: str, keep: int) -> None:
    d = out / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "digest": digest, "model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
    os.replace(tmp, path)
    for old in _checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)


def _check_run(out: Path, cfg: TrainConfig, fresh: bool) -> None:
    """out/run.json names the config a run started with; resuming under another is refused."""
    run = out / "run.json"
    if fresh:
        import shutil

        for sub in ("checkpoints", "prepared", "model"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in ("log.jsonl", "run.json"):
            (out / f).unlink(missing_ok=True)
    if run.exists():
        try:
            digest = json.loads(run.read_text())["digest"]
        except (ValueError, KeyError) as exc:
            raise InvalidParameterError(f"{run} is unreadable ({exc})", "pass --fresh to start over") from exc
        if digest != cfg.digest:
            raise InvalidParameterError(f"{out} holds a run with another config (digest {digest}, this config "
                                        f"{cfg.digest})", "resume with the original config, or pass --fresh "
                                        "or another --out to start a new run")
    else:
        out.mkdir(parents=True, exist_ok=True)
        run.write_text(json.dumps({"digest": cfg.digest, "config": cfg.to_dict()}, indent=2) + "\n")


def _read_log(out: Path, upto: int) -> list[dict]:
    """The log's records up to step `upto` (a killed run's later records are dropped: they are redone)."""
    path = out / "log.jsonl"
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            break  # a torn last line
        if rec["step"] > upto:
            break
        keep.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return keep


# ---- the run ---------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str | Path, *, fresh: bool = False, max_steps: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the run in `out`; returns the summary (also written to out/summary.json)."""
    out = Path(out)
    dist = Dist()
    try:
        if dist.main:
            _check_run(out, cfg, fresh)
        dist.barrier()
        if not dist.main:
            _check_run(out, cfg, False)
        summary = _train(cfg, out, dist, max_steps, progress)
        dist.barrier()  # every rank is done with the group before any tears it down
        return summary
    finally:
        dist.close()


def _train(cfg: TrainConfig, out: Path, dist: Dist, max_steps: int | None, progress: bool) -> dict:
    from tierlm.memory.hashing import table_values

    t_start = time.perf_counter()
    tokenizer, train_streams, val_streams, token_map = prepare(cfg, out, dist)
    if cfg.optim.batch_size % dist.world:
        raise InvalidParameterError(f"optim.batch_size {cfg.optim.batch_size} does not split over {dist.world} "
                                    "processes", "use a batch size divisible by the process count")
    curriculum = Curriculum(cfg.curriculum, train_streams, cfg.optim.batch_size, cfg.seed)
    mc = model_config(cfg, tokenizer, token_map, out.name)
    longest = max(s.seq_len for s in cfg.curriculum.stages)
    if longest > mc.max_position_embeddings:
        raise InvalidParameterError(f"a stage runs sequences of {longest} tokens, the model holds "
                                    f"{mc.max_position_embeddings} positions", "raise model.max_position_embeddings")
    model = build_model(mc, token_map, cfg.seed, dist.device)
    opt = optimizer(model, cfg)
    start = 0
    ckpts = _checkpoints(out)
    if ckpts:
        state = torch.load(ckpts[-1], map_location=dist.device, weights_only=False)
        if state.get("digest") != cfg.digest:
            raise InvalidParameterError(f"{ckpts[-1]} comes from another config",
                                        "resume with the original config, or pass --fresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    log = _read_log(out, start) if dist.main else []
    wrapped = LMLoss(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(wrapped)
    val = validation_batches(val_streams, cfg.eval.batches, cfg.eval.batch_size, cfg.eval.seq_len, cfg.seed)
    total = curriculum.total_steps
    stop = min(total, max_steps) if max_steps else total
    bar = None
    if dist.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    logf = open(out / "log.jsonl", "a") if dist.main else None
    tokens = log[-1]["tokens"] if log else 0
    t_loop, tokens_loop = time.perf_counter(), 0
    model.train()
    try:
        for step in range(start, stop):
            plan = curriculum.stage_at(step)
            windows = torch.from_numpy(curriculum.batch(step)[dist.rank::dist.world]).to(dist.device)
            factor = lr_factor(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss = wrapped(windows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            value = dist.mean(loss)
            step_tokens = cfg.optim.batch_size * plan.spec.seq_len
            tokens += step_tokens
            tokens_loop += step_tokens
            done = step + 1
            rec = {"step": done, "loss": value, "lr": cfg.optim.lr * factor, "tokens": tokens, "stage": plan.spec.name,
                   "seq_len": plan.spec.seq_len, "competence": round(curriculum.competence(step), 4)}
            if dist.main and (done % cfg.eval.every == 0 or done == total):
                rec["val_loss"] = evaluate(model, val, dist.device)
            if dist.main:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log.append(rec)
            if bar is not None:
                tok_s = tokens_loop / max(1e-9, time.perf_counter() - t_loop)
                bar.set_postfix_str(f"{plan.spec.name} loss {value:.3f} {tok_s:,.0f} tok/s", refresh=False)
                bar.update(1)
            if done % cfg.checkpoint.every == 0 or done == total:
                if dist.main:
                    save_state(out, done, model, opt, cfg.digest, cfg.checkpoint.keep)
                dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        if logf is not None:
            logf.close()
    elapsed = time.perf_counter() - t_loop
    summary: dict = {}
    if dist.main:
        finished = stop == total
        if finished:
            from tierlm.models.export import save_checkpoint

            save_checkpoint(model, tokenizer, out / "model", token_map, source="tierlm-train",
                            train_config_digest=cfg.digest)
        vals = [r for r in log if "val_loss" in r]
        summary = {
            "out": str(out), "finished": finished, "steps": log[-1]["step"] if log else 0, "total_steps": total,
            "tokens": tokens, "train_loss": log[-1]["loss"] if log else None,
            "val_loss": vals[-1]["val_loss"] if vals else None,
            "val_ppl": math.exp(vals[-1]["val_loss"]) if vals else None,
            "tokens_per_s": tokens_loop / elapsed if elapsed > 0 and tokens_loop else None,
            "params": mc.num_params, "table_params": table_values(mc.engram) if mc.engram else 0,
            "world_size": dist.world, "wall_s": time.perf_counter() - t_start,
            "model_dir": str(out / "model") if finished else None, "config_digest": cfg.digest,
        }
        if log:
            from tierlm.train.plots import loss_plot

            loss_plot(log, [(p.spec.name, p.first_step) for p in curriculum.stages], out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
