"""Deterministic prefetch of Engram rows: a step's row ids depend only on its token ids, so as soon as the engine
knows them it hands them here and a worker thread gathers the rows into a staging buffer while the forward pass
runs the layers before the first Engram layer. `get` then waits (normally not at all) and returns the rows.

    pf = Prefetcher(table, hasher)
    ticket = pf.submit(ids, history)      # right after scheduling a step
    rows = pf.get(ticket)                 # in the Engram layer: [..., T, slots, dim]

A failure on the worker (a bad id, an unreadable table) is raised by `get`, in the caller's thread. `fetch_s`: the
worker's time hashing and gathering; `wait_s`: the time `get` waited for it (the latency prefetch did not hide).
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
        self.fetch_s = self.wait_s = 0.0

    def rows(self, ids: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The rows for normalized ids [..., T], synchronously: [..., T, slots, dim] fp32."""
        t0 = time.perf_counter()
        rid = self.hasher.row_ids(ids.cpu(), None if history is None else history.cpu())
        out = self.table.gather(rid, self.device).view(*rid.shape, self.table.dim)
        self.fetch_s += time.perf_counter() - t0
        return out

    def submit(self, ids: torch.Tensor, history: torch.Tensor | None = None) -> Future:
        return self._pool.submit(self.rows, ids.clone(), None if history is None else history.clone())

    def get(self, ticket: Future) -> torch.Tensor:
        if ticket.done():
            return ticket.result()
        t0 = time.perf_counter()
        try:
            return ticket.result()
        finally:
            self.wait_s += time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
