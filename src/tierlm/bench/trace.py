"""Trace replay: a JSONL file of requests in the style of Mooncake's published traces.

One JSON object per line:

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

timestamp is in milliseconds; hash_ids name the prompt's 512-token blocks, and two requests that
share a hash id share that block's tokens (that is how the trace encodes prefix reuse). Knobs:

    path        the JSONL file (required)
    block       tokens per hash id; below 512 the whole trace is scaled down by block/512 (input
                lengths too), so a long-context trace can be replayed on a small machine
    limit       replay only the first N requests (0: all)
    replay      1: arrivals follow the timestamps (open loop); 0: the arrival plan decides
    time_scale  multiply the gaps between timestamps (0.5: twice as fast)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tierlm.core.errors import InvalidParameterError

TRACE_BLOCK_TOKENS = 512
_FIELDS = ("timestamp", "input_length", "output_length")


def read_trace(path: str | Path, limit: int = 0) -> list[dict]:
    """Validated trace rows. InvalidParameterError names the file, line and field on bad input."""
    p = Path(path)
    if not str(path) or not p.is_file():
        raise InvalidParameterError(f"trace file {str(path)!r} not found", "pass trace:path=FILE.jsonl")
    rows = []
    with open(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InvalidParameterError(f"{p}:{lineno} is not JSON", "write one JSON object per line") from None
            missing = [f for f in _FIELDS if not isinstance(row.get(f), int | float)]
            if missing:
                raise InvalidParameterError(f"{p}:{lineno} lacks numeric {', '.join(missing)}",
                                            "give timestamp, input_length, output_length (and hash_ids)")
            if not isinstance(row.get("hash_ids", []), list):
                raise InvalidParameterError(f"{p}:{lineno}: hash_ids is not a list", "give a list of block ids")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise InvalidParameterError(f"trace file {p} has no requests", "add at least one JSON line")
    return rows


@dataclass(frozen=True)
class TraceItem:
    prompt_ids: list[int]
    output_len: int
    arrival_s: float | None  # from the trace start; None when the arrival plan decides


def build_trace(src, path: str = "", block: int = TRACE_BLOCK_TOKENS, limit: int = 0, time_scale: float = 1.0,
                replay: int = 1) -> tuple[str, list[TraceItem]]:
    """(shape line, items) of a trace; `src.take(n)` supplies n fresh token ids (workloads.TokenSource)."""
    if block < 1:
        raise InvalidParameterError("trace: block must be >= 1", "e.g. block=64 to scale a trace down 8x")
    rows = read_trace(path, limit)
    scale = block / TRACE_BLOCK_TOKENS
    blocks: dict[int, list[int]] = {}
    t0 = min(r["timestamp"] for r in rows)
    reqs = []
    for i, row in enumerate(sorted(rows, key=lambda r: r["timestamp"])):
        n_in = max(1, round(row["input_length"] * scale))
        ids: list[int] = []
        for h in row.get("hash_ids", []):
            if len(ids) >= n_in:
                break
            if h not in blocks:
                blocks[h] = src.take(block)
            ids.extend(blocks[h])
        ids = ids[:n_in] + src.take(n_in - len(ids))
        arrival = (row["timestamp"] - t0) / 1000.0 * time_scale if replay else None
        reqs.append(TraceItem(ids, max(1, int(row["output_length"])), arrival))
    mean_in = sum(len(r.prompt_ids) for r in reqs) / len(reqs)
    span = (max(r["timestamp"] for r in rows) - t0) / 1000.0 * time_scale
    how = f"replayed over {span:.1f} s" if replay else "arrivals from the plan"
    return (f"trace {Path(path).name}: {len(reqs)} requests, mean input {mean_in:.0f} tokens, "
            f"{block}-token blocks, {how}"), reqs
