"""DriftGuard: runtime rollback of a lossy KV format, decided by shadow-scoring live requests.

A lossy KV format (FP8) passed `tierlm drift` before it shipped; the guard watches it in production, where
a calibration that no longer fits the traffic, a changed kernel or a broken scale would otherwise shift
outputs silently. It works in three parts:

1. Capture (engine thread, hot path, cheap). A share `fraction` of new requests is chosen (deterministically:
   every 1/fraction-th). While such a request generates, each logits row it samples from leaves its top-k
   log-probabilities (k = 32 by default: 384 bytes a token) on the request.
2. Score (the guard's worker thread, off the hot path). When the request finishes, its tokens and those
   top-k go on a bounded queue (full: the request is dropped from scoring and counted, the engine never
   waits). The worker runs a teacher-forced reference forward over prompt + output in the safe KV format
   (the compute dtype) on a private KV storage, chunk by chunk, and compares each output position:
   KL(reference || candidate) over the candidate's top-k tokens plus one bucket for the rest
   (bucketed_kl below, a lower bound of the full KL) and top-1 agreement. On CPU the worker runs one
   intra-op thread at the lowest OS priority, so serving keeps both cores whenever it has work; on CUDA it
   runs on its own stream.
3. Decide. A rolling window holds the last `window_tokens` scored tokens (whole requests). From
   `min_tokens` on, a mean KL above `max_kl_mean` or a top-1 agreement below `min_top1_agreement` trips the
   guard: it logs once, writes the trip to a state file, and the engine switches new requests to the safe
   format once the running ones have drained (engine/llm_engine.py: same KV byte budget, so fewer blocks).
   It stays switched, across restarts too, until re-armed (`POST /admin/drift/rearm`, or `--drift-rearm`).

The guard scores a lossless candidate too (the reference config): its KL is rounding noise and must never
trip it (tests/engine/test_drift_guard.py).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tierlm.attention import AttentionContext, AttentionMetadata, select_backend
from tierlm.config import DriftGuardConfig
from tierlm.kvcache import KVSpec, KVStorage

log = logging.getLogger(__name__)

_CHUNK = 256  # tokens per reference forward (bounds activations); logits are taken 64 rows at a time
_ROWS = 64


@dataclass
class ShadowJob:
    """One finished request to score: its tokens and what the candidate said at each output position."""
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    top_logprobs: torch.Tensor  # [T, k] fp32: the candidate's log-probabilities of its k likeliest tokens
    top_ids: torch.Tensor  # [T, k] int64


@dataclass
class JobScore:
    tokens: int
    kl_sum: float
    top1_agree: int


def bucketed_kl(ref_logits: torch.Tensor, cand_top_logprobs: torch.Tensor, cand_top_ids: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) per position over the candidate's k kept tokens and one "rest" bucket:
    ref_logits [N, V]; cand_top_logprobs, cand_top_ids [N, k] (log-probabilities of the full candidate
    distribution, distinct ids) -> [N] fp64 nats, >= 0. Merging tokens never raises a KL, so this is a lower
    bound of the full-vocabulary KL (drift.metrics.kl_divergence), equal to it when k covers the vocabulary."""
    if cand_top_logprobs.shape != cand_top_ids.shape or cand_top_ids.shape[0] != ref_logits.shape[0]:
        raise ValueError(f"top-k of shape {tuple(cand_top_logprobs.shape)} / {tuple(cand_top_ids.shape)} for "
                         f"logits {tuple(ref_logits.shape)}")
    lp = torch.log_softmax(ref_logits.to(torch.float64), dim=-1).gather(1, cand_top_ids.long())  # [N, k]
    lq = cand_top_logprobs.to(torch.float64)
    p, q = lp.exp(), lq.exp()
    kept = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - q.sum(-1)).clamp_min(1e-12)  # a candidate with all its mass in k tokens still leaves rounding
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (kept + rest).clamp_min(0.0)


class ReferenceScorer:
    """Teacher-forced logits of a token sequence in the safe KV format, on a KV storage of its own (sized to
    the sequence, freed after), with its own attention backend instance: it shares only the read-only model
    weights with the engine, so it can run on another thread."""

    def __init__(self, model, model_config, kv_format: str, block_size: int, device: torch.device,
                 dtype: torch.dtype, backend_name: str):
        self.model = model
        self.spec = KVSpec.from_model(model_config, kv_format, block_size)
        self.device = device
        self.backend = select_backend(backend_name, device, dtype, kv_format)

    @torch.inference_mode()
    def score(self, job: ShadowJob) -> JobScore:
        tokens = job.prompt_ids + job.output_ids
        p, n = len(job.prompt_ids), len(job.output_ids)
        bs = self.spec.block_size
        storage = KVStorage(self.spec, -(-len(tokens) // bs), self.device)
        table = torch.arange(storage.num_blocks, dtype=torch.long, device=self.device)
        cand_lp, cand_ids = job.top_logprobs.to(self.device), job.top_ids.to(self.device)
        kl_sum, agree = 0.0, 0
        last = p + n - 1  # the final output token is never input: logits at positions p-1 .. p+n-2
        for start in range(0, last, _CHUNK):
            end = min(start + _CHUNK, last)
            ids = torch.tensor(tokens[start:end], dtype=torch.long, device=self.device)
            pos = torch.arange(start, end, dtype=torch.long, device=self.device)
            meta = AttentionMetadata(block_size=bs, slot_mapping=pos.clone(), num_decodes=0, decode_block_tables=None,
                                     decode_seq_lens=None, prefill_query_lens=[end - start], prefill_seq_lens=[end],
                                     prefill_block_tables=[table[: -(-end // bs)]])
            self.backend.prepare(meta, storage.num_blocks)
            hidden = self.model(ids, pos, AttentionContext(meta, storage, self.backend))
            first = max(start, p - 1)  # first position of this chunk that predicts an output token
            for r0 in range(first, end, _ROWS):
                r1 = min(r0 + _ROWS, end)
                ref = self.model.compute_logits(hidden[r0 - start:r1 - start]).float()
                o0, o1 = r0 - (p - 1), r1 - (p - 1)  # output positions
                kl_sum += float(bucketed_kl(ref, cand_lp[o0:o1], cand_ids[o0:o1]).sum())
                agree += int((ref.argmax(-1) == cand_ids[o0:o1, 0]).sum())
        return JobScore(n, kl_sum, agree)


def state_path(config: DriftGuardConfig, identity: dict) -> Path:
    """Where a trip of this model + candidate KV format is remembered: config.state_path, else
    <cache>/drift/rollback-<digest of the identity>.json."""
    if config.state_path:
        return Path(config.state_path).expanduser()
    from tierlm.paths import cache_root

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "drift" / f"rollback-{digest}.json"


class DriftGuard:
    """Shadow scoring, the rolling window and the trip (see the module doc). Thread-safe where it must be:
    `want`/`submit` run on the engine thread, scoring on the worker, `status`/`rearm` anywhere."""

    def __init__(self, config: DriftGuardConfig, scorer: ReferenceScorer, identity: dict, device: torch.device):
        self.config = config
        self.scorer = scorer
        self.identity = identity  # model + candidate KV format: what a remembered trip applies to
        self.device = device
        self.path = state_path(config, identity)
        self._lock = threading.Lock()
        self._window: collections.deque[JobScore] = collections.deque()
        self._win_tokens, self._win_kl, self._win_agree = 0, 0.0, 0
        self._acc = 0.0  # the sampling accumulator: a request is chosen each time it reaches 1
        self.tripped = False
        self.reason = ""
        self.tripped_at: float | None = None
        self.counters = {"chosen": 0, "scored_requests": 0, "scored_tokens": 0, "dropped_queue_full": 0,
                         "skipped_too_long": 0, "errors": 0, "trips": 0,
                         # where the time goes: the capture on the engine thread (wall), the worker's CPU
                         "engine_seconds": 0.0, "worker_cpu_seconds": 0.0}
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_pending)
        self._idle = threading.Condition()
        self._busy = 0
        if config.rearm and self.path.exists():
            self.path.unlink()
            log.info("drift guard: forgot the remembered trip in %s (--drift-rearm)", self.path)
        self._load_state()
        threads = torch.get_num_threads()
        self._configured = threading.Event()
        self._thread = threading.Thread(target=self._work, name="tierlm-drift-guard", daemon=True)
        self._thread.start()
        if device.type == "cpu" and self._configured.wait(30):
            # torch.set_num_threads(1) on the worker also set the default that threads started later take:
            # put it back from this thread (whose own count it leaves as it was).
            torch.set_num_threads(threads)

    # ---- engine thread ---------------------------------------------------------------------------------
    def want(self) -> bool:
        """Shadow-score the request being added? Every 1/fraction-th request while not tripped."""
        if self.tripped:
            return False
        self._acc += self.config.fraction
        if self._acc < 1.0 - 1e-9:
            return False
        self._acc -= 1.0
        self.counters["chosen"] += 1
        return True

    def submit(self, job: ShadowJob) -> bool:
        """Queue a finished request for scoring; False (counted) when it is too long or the queue is full."""
        if len(job.prompt_ids) + len(job.output_ids) > self.config.max_seq_tokens:
            self.counters["skipped_too_long"] += 1
            return False
        with self._idle:
            self._busy += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._busy -= 1
            self.counters["dropped_queue_full"] += 1
            return False
        return True

    # ---- worker thread -----------------------------------------------------------------------------
    def _work(self) -> None:
        if self.device.type == "cpu":
            # One intra-op thread for this thread only: run one parallel op first, so torch's once-per-thread
            # thread-count init is done and does not undo the 1 when the constructor restores the default.
            torch.ones(1 << 16).sum()
            torch.set_num_threads(1)
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
        self._configured.set()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            job = self._queue.get()
            if job is None:
                return
            t0 = time.thread_time()
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        score = self.scorer.score(job)
                else:
                    score = self.scorer.score(job)
                self._record(score)
            except Exception:  # noqa: BLE001 - a scoring failure costs one sample, never the engine
                self.counters["errors"] += 1
                log.exception("drift guard: scoring request %s failed", job.request_id)
            finally:
                self.counters["worker_cpu_seconds"] += time.thread_time() - t0
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _record(self, s: JobScore) -> None:
        c = self.config
        with self._lock:
            self.counters["scored_requests"] += 1
            self.counters["scored_tokens"] += s.tokens
            if self.tripped:
                return
            self._window.append(s)
            self._win_tokens += s.tokens
            self._win_kl += s.kl_sum
            self._win_agree += s.top1_agree
            while len(self._window) > 1 and self._win_tokens - self._window[0].tokens >= c.window_tokens:
                old = self._window.popleft()
                self._win_tokens -= old.tokens
                self._win_kl -= old.kl_sum
                self._win_agree -= old.top1_agree
            if self._win_tokens < c.min_tokens:
                return
            kl, top1 = self._win_kl / self._win_tokens, self._win_agree / self._win_tokens
            broken = []
            if kl > c.max_kl_mean:
                broken.append(f"mean KL {kl:.4f} > {c.max_kl_mean}")
            if top1 < c.min_top1_agreement:
                broken.append(f"top-1 agreement {top1:.4f} < {c.min_top1_agreement}")
            if not broken:
                return
            self.tripped, self.tripped_at = True, time.time()
            self.reason = f"{' and '.join(broken)} over the last {self._win_tokens} scored tokens"
            self.counters["trips"] += 1
        log.warning("drift guard tripped: %s; new requests run with the safe KV format until re-armed "
                    "(POST /admin/drift/rearm or --drift-rearm)", self.reason)
        self._save_state()

    # ---- state ---------------------------------------------------------------------------------------
    def _save_state(self) -> None:
        doc = {"identity": self.identity, "reason": self.reason, "tripped_at": self.tripped_at,
               "window": self.window()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(self.path)
        except OSError as e:  # the trip still holds for this process
            log.warning("drift guard: could not remember the trip in %s (%s): a restart forgets it", self.path, e)

    def _load_state(self) -> None:
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("identity") != self.identity:
                log.warning("drift guard: %s remembers a trip of another model or KV format; ignored", self.path)
                return
            self.tripped, self.tripped_at = True, float(doc.get("tripped_at") or time.time())
            self.reason = f"remembered from an earlier run: {doc.get('reason', '?')}"
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("drift guard: unreadable state file %s (%s); starting armed", self.path, e)
            return
        log.warning("drift guard: %s; serving with the safe KV format until re-armed (POST /admin/drift/rearm "
                    "or --drift-rearm)", self.reason)

    def rearm(self) -> bool:
        """Clear a trip (and its state file) and start a fresh window. Returns whether it was tripped."""
        with self._lock:
            was = self.tripped
            self.tripped, self.reason, self.tripped_at = False, "", None
            self._window.clear()
            self._win_tokens, self._win_kl, self._win_agree = 0, 0.0, 0
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("drift guard: could not delete %s (%s): a restart would roll back again", self.path, e)
        if was:
            log.warning("drift guard re-armed: new requests run with the candidate KV format again")
        return was

    # ---- reading ------------------------------------------------------------------------------------
    def window(self) -> dict:
        with self._lock:
            n = self._win_tokens
            return {"tokens": n, "requests": len(self._window),
                    "kl_mean": self._win_kl / n if n else None, "top1_agreement": self._win_agree / n if n else None}

    def status(self) -> dict:
        return {"tripped": self.tripped, "reason": self.reason or None, "tripped_at": self.tripped_at,
                "fraction": self.config.fraction,
                "limits": {"max_kl_mean": self.config.max_kl_mean,
                           "min_top1_agreement": self.config.min_top1_agreement,
                           "window_tokens": self.config.window_tokens, "min_tokens": self.config.min_tokens},
                "window": self.window(), **self.counters}

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every queued request is scored (tests, benches)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def close(self) -> None:
        """Stop the worker after the queued jobs (safe to call twice)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
