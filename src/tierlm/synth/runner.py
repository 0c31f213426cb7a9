"""Run a synth job: generate every sample not yet in samples.jsonl, decide it (constraint, then duplicates), append
it, in job order; then write accepted.jsonl, summary.json and the report.

Two backends make the text:
  in-process  an LLMEngine (any `tierlm bench` config by name) fed through its batch path: up to twice
              max_num_seqs requests in flight, each with its own seed and the job's constraint
  url         any OpenAI-compatible server (tierlm serve, vLLM, llama.cpp's server): concurrent requests with
              the constraint as response_format (JSON) or vLLM's guided_regex / guided_choice / guided_grammar

Samples finish out of order; they are decided and written in order (a small reorder buffer), so duplicates are
judged against the same earlier samples whether the job ran in one go or was killed and resumed, and the records
of a resumed job are exactly those of an uninterrupted one.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tierlm.core.errors import InvalidParameterError
from tierlm.synth.check import Checker, reason_kind
from tierlm.synth.dedup import Deduplicator
from tierlm.synth.job import Job, Sample
from tierlm.synth.journal import Journal

DEFAULT_MAX_TOKENS = 256
ACCEPTED = "accepted.jsonl"


@dataclass
class Result:
    text: str
    output_tokens: int
    prompt_tokens: int
    finish_reason: str | None


@dataclass
class RunStats:
    """This session's generation (a resumed job's earlier sessions are not in it)."""

    backend: str
    config: str
    model: str
    samples: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    wall_s: float = 0.0
    kv_bytes_per_token: int | None = None
    kv_bytes_per_session: float | None = None  # referenced KV bytes / running sessions, at the peak
    peak_sessions: int = 0
    config_digest: str | None = None
    start: int = 0  # the first record this session wrote (a session writes records start .. start + samples - 1)
    extra: dict = field(default_factory=dict)


# ---- the in-process backend ------------------------------------------------------------------------
class EngineBackend:
    name = "in-process"

    def __init__(self, job: Job, config: str = "baseline", engine=None, max_num_seqs: int = 32,
                 kv_memory: int = 1 << 30, out: Path | None = None):
        from tierlm.engine.llm_engine import LLMEngine

        self.job = job
        self.config = config
        if engine is None:
            engine = LLMEngine(engine_config(job, config, max_num_seqs, kv_memory, out))
        self.engine = engine
        self.model = job.model or "default"

    def close(self) -> None:
        self.engine.close()

    def prompt_ids(self, sample: Sample) -> list[int]:
        tok = self.engine.tokenizer
        text = sample.prompt.text
        if self.job.chat and tok.has_chat_template:
            msgs = ([{"role": "system", "content": self.job.system}] if self.job.system else []) + [
                {"role": "user", "content": text}]
            return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
        return tok.encode(text)

    def params(self, sample: Sample):
        from tierlm.core.sampling_params import SamplingParams

        kw = dict(self.job.sampling)
        kw.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        return SamplingParams(seed=sample.seed, structured_outputs=self.job.constraint, **kw)

    def run(self, samples: list[Sample], done: Callable[[Sample, Result], None],
            stats: RunStats | None = None) -> RunStats:
        engine = self.engine
        stats = stats or RunStats(self.name, self.config, self.model)
        stats.kv_bytes_per_token = engine.kv_spec.bytes_per_token
        stats.config_digest = config_digest(engine.config)
        window = 2 * engine.scheduler.config.max_num_seqs
        queue = list(reversed(samples))
        flight: dict[str, Sample] = {}
        peak_blocks = 0
        t0 = time.perf_counter()
        try:
            while queue or flight:
                while queue and len(flight) < window:
                    s = queue.pop()
                    engine.add_request(self.prompt_ids(s), self.params(s), request_id=s.id)
                    flight[s.id] = s
                for out in engine.step():
                    if not out.finished:
                        continue
                    s = flight.pop(out.request_id)
                    c = out.outputs[0]
                    r = Result(c.text, len(c.token_ids), len(out.prompt_token_ids), c.finish_reason)
                    stats.samples += 1
                    stats.output_tokens += r.output_tokens
                    stats.prompt_tokens += r.prompt_tokens
                    done(s, r)
                used = engine.kv.num_blocks - engine.kv.num_free_blocks
                running = len(engine.scheduler.running)
                if running and (used > peak_blocks or running > stats.peak_sessions):
                    peak_blocks = max(peak_blocks, used)
                    stats.kv_bytes_per_session = used * engine.kv_spec.page_size_bytes / running
                stats.peak_sessions = max(stats.peak_sessions, running)
        finally:
            for rid in list(flight):
                engine.abort_request(rid)
            stats.wall_s = time.perf_counter() - t0
        return stats


def engine_config(job: Job, config: str, max_num_seqs: int, kv_memory: int, out: Path | None):
    """The EngineConfig of a bench config name for this job (its tiers, if any, under the job's directory)."""
    from dataclasses import replace

    from tierlm.bench.configs import engine_config as bench_engine_config
    from tierlm.bench.configs import get_config, reference_config
    from tierlm.config import TierConfig

    bc = get_config(config)
    if "redis" in bc.tiers:
        raise InvalidParameterError(f"config {config} needs a Redis server", "pick a config without the Redis tier")
    ref = reference_config(job.model, "auto", "auto", None, kv_memory, max_num_seqs, 2048, 2048)
    tiers = TierConfig(host_memory_bytes=4 * kv_memory, disk_dir=str((out or Path(".")) / "kv-disk"))
    cfg = bench_engine_config(config, ref, 512, tiers)
    return replace(cfg, model=job.model)


def config_digest(cfg) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the URL backend -------------------------------------------------------------------------------
class URLBackend:
    name = "url"

    def __init__(self, job: Job, url: str, concurrency: int = 16, api_key: str | None = None):
        from tierlm.bench.http_driver import ServerUnreachableError, check_server

        self.job = job
        self.url = url.rstrip("/").removesuffix("/v1")
        self.concurrency = concurrency
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            models = check_server(self.url, api_key=api_key)
        except ServerUnreachableError as e:
            raise InvalidParameterError(f"cannot reach {self.url}: {e.problem}",
                                        "start the server (e.g. tierlm serve) or fix url in the job / --url") from None
        self.model = job.model or (models[0] if models else "default")
        self.config = f"url:{self.url}"

    def close(self) -> None:
        pass

    def body(self, sample: Sample) -> tuple[str, dict]:
        kw = dict(self.job.sampling)
        kw.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        body = dict(kw, model=self.model, seed=sample.seed)
        c = self.job.constraint
        if c is not None:
            if c.kind == "json":
                schema = c.json if isinstance(c.json, dict) else json.loads(c.json)
                name = re.sub(r"[^A-Za-z0-9_-]", "_", self.job.name)[:64] or "schema"  # OpenAI's name rule
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
            elif c.kind == "json_object":
                body["response_format"] = {"type": "json_object"}
            else:
                body[f"guided_{c.kind}"] = getattr(c, c.kind)
        if self.job.chat:
            msgs = ([{"role": "system", "content": self.job.system}] if self.job.system else []) + [
                {"role": "user", "content": sample.prompt.text}]
            return "/v1/chat/completions", dict(body, messages=msgs)
        return "/v1/completions", dict(body, prompt=sample.prompt.text)

    def run(self, samples: list[Sample], done: Callable[[Sample, Result], None],
            stats: RunStats | None = None) -> RunStats:
        stats = stats or RunStats(self.name, self.config, self.model)
        t0 = time.perf_counter()
        try:
            asyncio.run(self._run(samples, done, stats))
        finally:
            stats.wall_s = time.perf_counter() - t0
        return stats

    async def _run(self, samples, done, stats: RunStats) -> None:
        import httpx

        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=600.0, headers=self.headers) as client:
            async def one(s: Sample) -> None:
                path, body = self.body(s)
                async with sem:
                    for attempt in range(8):
                        try:
                            resp = await client.post(path, json=body)
                        except httpx.HTTPError as e:
                            raise InvalidParameterError(f"the server at {self.url} failed mid-job ({type(e).__name__})",
                                                        "restart it and run the job again: it resumes") from None
                        if resp.status_code == 503 and attempt < 7:  # queue full: wait as told
                            await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                            continue
                        break
                if resp.status_code != 200:
                    try:
                        msg = resp.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = resp.text[:200]
                    raise InvalidParameterError(f"the server refused sample {s.id}: {resp.status_code} {msg}",
                                                "fix the job (sampling, constraint, model) for this server")
                data = resp.json()
                ch = data["choices"][0]
                text = ch["message"]["content"] if "message" in ch else ch["text"]
                usage = data.get("usage") or {}
                r = Result(text or "", int(usage.get("completion_tokens", 0)), int(usage.get("prompt_tokens", 0)),
                           ch.get("finish_reason"))
                stats.samples += 1
                stats.output_tokens += r.output_tokens
                stats.prompt_tokens += r.prompt_tokens
                done(s, r)

            tasks = [asyncio.create_task(one(s)) for s in samples]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()


# ---- deciding and writing --------------------------------------------------------------------------
class Decider:
    """Takes results in any order, decides and appends them in job order."""

    def __init__(self, job: Job, journal: Journal, model: str, config: str, config_digest: str | None,
                 progress=None):
        self.job = job
        self.journal = journal
        self.checker = Checker(job.constraint)
        self.dedup = Deduplicator(job.dedup)
        self.meta = {"model": model, "config": config, "config_digest": config_digest, "job_digest": job.digest}
        self.next = len(journal.records)
        self.buffer: dict[int, tuple[Sample, Result]] = {}
        self.progress = progress
        self.counts = {"accepted": 0, "rejected": 0}
        for rec in journal.records:  # replay the dedup decisions of what is already written
            if rec["accepted"]:
                self.dedup.check(rec["id"], rec["text"])
            self.counts["accepted" if rec["accepted"] else "rejected"] += 1

    def __call__(self, sample: Sample, result: Result) -> None:
        self.buffer[sample.index] = (sample, result)
        while self.next in self.buffer:
            s, r = self.buffer.pop(self.next)
            self._decide(s, r)
            self.next += 1

    def _decide(self, s: Sample, r: Result) -> None:
        reason = self.checker.check(r.text, r.finish_reason)
        if reason is None:
            reason = self.dedup.check(s.id, r.text)
        rec = {"index": s.index, "id": s.id, "template": s.prompt.template, "variables": s.prompt.variables,
               "sample": s.sample, "seed": s.seed, "prompt": s.prompt.text, "text": r.text,
               "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens, "finish_reason": r.finish_reason,
               "accepted": reason is None, "reject": reason, **self.meta}
        self.journal.append(rec)
        self.counts["accepted" if reason is None else "rejected"] += 1
        if self.progress is not None:
            self.progress(rec)


RUNS = "runs"  # one JSON file per session that generated samples, rewritten as it goes
CHECKPOINT_S = 2.0


class Session:
    """This session's stats on disk (out/runs/<id>.json), counted over the records it wrote; rewritten at most
    every CHECKPOINT_S seconds and at the end, so a killed session still counts (up to its last write)."""

    def __init__(self, out: Path, stats: RunStats, start: int):
        self.path = out / RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        self.stats = stats
        self.stats.start = start
        self.t0 = time.perf_counter()
        self.written = 0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self._last = 0.0

    def record(self, rec: dict) -> None:
        self.written += 1
        self.output_tokens += rec["output_tokens"]
        self.prompt_tokens += rec["prompt_tokens"]
        if time.perf_counter() - self._last >= CHECKPOINT_S:
            self.save()

    def save(self) -> None:
        if not self.written:
            return
        self._last = time.perf_counter()
        d = asdict(self.stats)
        d.update(samples=self.written, output_tokens=self.output_tokens, prompt_tokens=self.prompt_tokens,
                 wall_s=self._last - self.t0)
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, self.path)


def session_totals(out: Path, stats: RunStats) -> RunStats:
    """The totals over every session that generated samples for this job (a resumed job's speed and cost count all
    of its sessions, a killed one up to its last checkpoint)."""
    paths = sorted((out / RUNS).glob("*.json")) if (out / RUNS).is_dir() else []
    sessions = [json.loads(p.read_text()) for p in paths]
    if not sessions:
        return stats
    total = RunStats(stats.backend, stats.config, stats.model, kv_bytes_per_token=stats.kv_bytes_per_token,
                     config_digest=stats.config_digest)
    for s in sessions:
        total.samples += s["samples"]
        total.output_tokens += s["output_tokens"]
        total.prompt_tokens += s["prompt_tokens"]
        total.wall_s += s["wall_s"]
        total.peak_sessions = max(total.peak_sessions, s["peak_sessions"])
        if s["kv_bytes_per_session"] is not None:
            total.kv_bytes_per_session = max(total.kv_bytes_per_session or 0.0, s["kv_bytes_per_session"])
        total.kv_bytes_per_token = total.kv_bytes_per_token or s["kv_bytes_per_token"]
        total.config_digest = total.config_digest or s["config_digest"]
    total.extra["sessions"] = len(sessions)
    total.extra["ranges"] = [(s["start"], s["start"] + s["samples"]) for s in sessions]
    return total


def write_accepted(journal: Journal) -> int:
    keep = [r for r in journal.records if r["accepted"]]
    tmp = journal.out / (ACCEPTED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(journal.out / ACCEPTED)
    return len(keep)


def reject_counts(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if not r["accepted"]:
            k = reason_kind(r["reject"])
            out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---- the job ---------------------------------------------------------------------------------------
def run_job(job: Job, out: Path, backend, *, fresh: bool = False, progress: bool = True,
            limit: int | None = None) -> dict:
    """Generate what samples.jsonl lacks (at most `limit` samples this time), then write accepted.jsonl and
    summary.json; returns the summary."""
    from tierlm.synth.report import summarize

    journal = Journal(out, job.digest, fresh=fresh)
    samples = job.samples()
    start = len(journal.records)
    if start > len(samples):
        raise InvalidParameterError(f"{journal.path} holds {start} records but the job has {len(samples)} samples",
                                    "write to another --out, or pass --fresh")
    todo = samples[start:] if limit is None else samples[start:start + limit]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), initial=start, unit="sample", dynamic_ncols=True)
    session = Session(out, RunStats(backend.name, backend.config, backend.model), start)

    def shown(rec: dict) -> None:
        session.record(rec)
        if bar is not None:
            c = decider.counts
            tok_s = session.output_tokens / max(1e-9, time.perf_counter() - session.t0)
            bar.set_postfix_str(f"accepted {c['accepted']} rejected {c['rejected']} {tok_s:,.0f} tok/s",
                                refresh=False)
            bar.update(1)

    decider = Decider(job, journal, backend.model, backend.config,
                      getattr(getattr(backend, "engine", None), "config", None) and config_digest(backend.engine.config),
                      progress=shown)
    try:
        if todo:
            backend.run(todo, decider, session.stats)
    finally:
        journal.close()
        session.save()
        if bar is not None:
            bar.close()
    write_accepted(journal)
    summary = summarize(job, journal.records, session_totals(out, session.stats), resumed_from=start, total=len(samples),
                        usd_per_hour=job.usd_per_hour)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
