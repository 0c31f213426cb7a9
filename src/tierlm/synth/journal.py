"""samples.jsonl: every sample of a job, accepted or not, one JSON record per line, in job order.

Records are appended (and flushed) as they are decided, so a killed job loses at most the samples in flight.
Reopening checks what is there: a last line without its newline is the write a kill cut short; it moves to
samples.jsonl.torn and the job goes on from the record before it. Anything else wrong (a line that is not JSON,
records out of order, records of another job spec) stops the job with one line naming the line and the fix; the
file is never rewritten or dropped.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tierlm.core.errors import InvalidParameterError

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"


class Journal:
    def __init__(self, out: Path, job_digest: str, fresh: bool = False):
        self.out = out
        self.path = out / SAMPLES
        self.job_digest = job_digest
        out.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            kept = self.path.with_name(f"{SAMPLES}.{time.strftime('%Y%m%d-%H%M%S')}.old")
            os.replace(self.path, kept)
            log.warning("--fresh: the earlier samples moved to %s", kept)
        self.records = self._read()
        self._f = None

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keep_to = len(data)
        if data and not data.endswith(b"\n"):  # a write cut short by a kill: set it aside, go on before it
            keep_to = data.rfind(b"\n") + 1
            with open(self.path.with_name(SAMPLES + ".torn"), "ab") as f:
                f.write(data[keep_to:] + b"\n")
            with open(self.path, "r+b") as f:
                f.truncate(keep_to)
            log.warning("%s ended in a partial record (the job was killed mid-write); it moved to %s.torn",
                        self.path, SAMPLES)
        records = []
        fix = f"move {self.path} aside (or pass --fresh, which keeps it as {SAMPLES}.<time>.old) and run again"
        for n, line in enumerate(data[:keep_to].decode("utf-8", errors="replace").splitlines(), 1):
            try:
                rec = json.loads(line)
            except ValueError:
                raise InvalidParameterError(f"{self.path} line {n} is not a JSON record (the file is corrupt)",
                                            fix) from None
            if not isinstance(rec, dict) or rec.get("index") != len(records):
                raise InvalidParameterError(f"{self.path} line {n} is not record {len(records)} of the job "
                                            "(records out of order or edited)", fix)
            if rec.get("job_digest") != self.job_digest:
                raise InvalidParameterError(f"{self.path} was written by another version of this job (its templates, "
                                            "variables, sampling, constraint, model or dedup changed)",
                                            "write to another --out, or pass --fresh to start over (the old records "
                                            f"are kept as {SAMPLES}.<time>.old)")
            records.append(rec)
        return records

    def append(self, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.records.append(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
