"""Deterministic prefetch of Engram rows: a step's row ids depend only on its token ids, so as soon as the engine
knows them it hands them here and a worker thread gathers the rows into a staging buffer while the forward pass
runs the layers before the first Engram layer. `get` then waits (normally not at all) and returns the rows.

    pf = Prefetcher(table, hasher)
    ticket = pf.submit(ids, history)      # right after scheduling a step
    rows = pf.get(ticket)                 # in the Engram layer: [..., T, slots, dim]

A failure on the worker (a bad id, an unreadable table) is raised by `get`, in the caller's thread. `fetch_s`: the
worker's time hashing and gathering; `wait_s`: the time `get` waited for it (the latency prefetch did not hide).

On CUDA with the table off the device (host memory or a mapped file) the worker gathers into pinned memory and copies
to the device on a side stream, the way the KV tiers load (kvcache/tiers/controller.py): `get` makes the compute
stream wait for that copy's event, on the device, and hands the rows to the compute stream (record_stream).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tierlm.memory.hashing import NGramHasher
from tierlm.memory.storage import EngramTable


class Prefetcher:
    def __init__(self, table: EngramTable, hasher: NGramHasher, device: str | torch.device = "cpu"):
        if hasher.total_rows > table.rows:
            raise ValueError(f"the hasher addresses {hasher.total_rows} rows, the table has {table.rows}")
        self.table, self.hasher, self.device = table, hasher, torch.device(device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
        self._stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda" and table.backend != "device"
                        else None)
        self.fetch_s = self.wait_s = 0.0

    def _fetch(self, ids: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        """(rows [..., T, slots, dim] fp32 on the device, the side stream's event after their copy, or None)."""
        t0 = time.perf_counter()
        rid = self.hasher.row_ids(ids.cpu(), None if history is None else history.cpu())
        ready = None
        if self._stream is None:
            out = self.table.gather(rid, self.device)
        else:
            host = self.table.gather(rid, "cpu", out=torch.empty((rid.numel(), self.table.dim), pin_memory=True))
            with torch.cuda.stream(self._stream):
                out = host.to(self.device, non_blocking=True)
                ready = self._stream.record_event()
        self.fetch_s += time.perf_counter() - t0
        return out.view(*rid.shape, self.table.dim), ready

    def _settle(self, rows: torch.Tensor, ready) -> torch.Tensor:
        if ready is not None:  # the caller's stream reads the rows after their copy; the allocator learns it uses them
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            rows.record_stream(stream)
        return rows

    def rows(self, ids: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The rows for normalized ids [..., T], synchronously: [..., T, slots, dim] fp32."""
        return self._settle(*self._fetch(ids, history))

    def submit(self, ids: torch.Tensor, history: torch.Tensor | None = None) -> Future:
        return self._pool.submit(self._fetch, ids.clone(), None if history is None else history.clone())

    def get(self, ticket: Future) -> torch.Tensor:
        if ticket.done():
            return self._settle(*ticket.result())
        t0 = time.perf_counter()
        try:
            return self._settle(*ticket.result())
        finally:
            self.wait_s += time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
