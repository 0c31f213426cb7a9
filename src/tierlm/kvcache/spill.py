"""Spilled blocks: sparse decoding over contexts larger than the device pool.

A sparse decode step reads a few blocks of each sequence per layer (attention/sparse.py), so the rest of a
long context need not sit in device memory. With a SpillStore, the KV manager spills a running sequence's
coldest full blocks (the ones its selector has not picked for longest) when the pool runs short: their KV,
every layer, is copied to host memory or a file mapped into memory, the device blocks return to the pool,
and the table entries become spill ids. A decode step then loads, per layer, only the spilled blocks the
selector picks. One id space covers everything a block table may hold:

    [0, num_pool)                   blocks the KV manager hands out (device)
    [num_pool, num_device)          staging blocks (device): per layer, where picked spilled blocks are loaded
    [num_device, num_ids)           spill ids: a block's KV off the device (LayerKV.spill), every layer

Selector metadata (Quest's key bounds) keeps a row per id on the device, so a spilled block is scored like
a resident one without being read; `spill` copies its rows along. Per layer, `stage` maps a decode step's
table onto device ids: a spilled block the layer already holds in one of its staging blocks is a hit, else
it is copied into a free one (or the one whose block the layer picked least recently), so the decode kernels
read every pick in place, FP8 or fp32. Picks stay mostly the same from one step to the next, so what a layer
staged at step t is the prefetch for step t + 1; a layer's staging blocks are its own (every layer's tensor
has them), so the staging cost is `staging` blocks in all, whatever the context. A table with more spilled
blocks than a layer can stage (a dense layer over a long spilled context) is left as it is: the backend then
reads it through LayerKV.read_blocks, which gathers spilled rows from the store (transient memory, counted
as `gathers`). Prefill chunks read their context the same way.

Backing: host memory (pinned when CUDA is available, so loads run as DMA) or, given a directory, a file
mapped with torch.from_file (the OS pages it in and out; removed on close). The store is private to the
engine and lives as long as its sequences: no entry format or checksum, unlike the KV tiers.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from tierlm.core.errors import InvalidParameterError
from tierlm.kvcache.storage import KVStorage, LayerSpill, _raw


class SpillStore:
    """`num_spill` spill slots (whole blocks, every layer) below the device pool of `storage`, whose device blocks
    [first_staging, storage.num_blocks) are the staging blocks. `directory`: back the slots with a file there."""

    def __init__(self, storage: KVStorage, num_spill: int, first_staging: int, directory: str | Path | None = None):
        if num_spill < 1:
            raise ValueError(f"num_spill {num_spill} < 1")
        if storage.num_ids != storage.num_blocks + num_spill:
            raise ValueError(f"storage has {storage.num_ids - storage.num_blocks} spill ids, not {num_spill}")
        if not 0 < first_staging <= storage.num_blocks:
            raise ValueError(f"first staging block {first_staging} outside (0, {storage.num_blocks}]")
        self.storage = storage
        self.num_spill = num_spill
        self.first_id = storage.num_blocks
        self.staging = list(range(first_staging, storage.num_blocks))
        self.path: Path | None = None
        self._buffer = self._allocate(directory)
        storage.spill = self
        self._free = list(range(num_spill - 1, -1, -1))  # slot numbers; pop() takes the lowest
        n_ids, n_layers = storage.num_ids, len(storage)
        dev = storage.device
        # Per layer: spill id -> staging block, least recently picked first; and a map of every id to the device
        # id a kernel reads (identity for device ids).
        self._staged: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(n_layers)]
        self._free_staging = [list(reversed(self.staging)) for _ in range(n_layers)]
        self._map = torch.arange(n_ids, device=dev).repeat(n_layers, 1)  # [L, num_ids]
        self.last_pick = torch.zeros(n_ids, dtype=torch.long, device=dev)  # clock of the last sparse pick per id
        self.clock = 0
        self.counters = {"spilled": 0, "freed": 0, "loads": 0, "hits": 0, "gathers": 0, "bytes_loaded": 0}

    # ---- setup -----------------------------------------------------------------------------------
    def _allocate(self, directory) -> torch.Tensor:
        """One byte buffer for every layer's spilled data and scales, viewed per layer as LayerSpill."""
        layers = self.storage.layers
        shapes = []
        for layer in layers:
            for t in (layer.data, layer.scales):
                if t is not None:
                    shapes.append((t, (2, self.num_spill, *t.shape[2:])))
        total = sum(t.element_size() * torch.Size(s).numel() for t, s in shapes)
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="tierlm-spill-", suffix=".bin", dir=directory)
            try:
                # Reserve every byte now: a mapped file that cannot grow later would kill the process (SIGBUS)
                # at the first spill past the disk's free space.
                os.posix_fallocate(fd, 0, total)
            except OSError as e:
                os.close(fd)
                os.unlink(name)
                raise InvalidParameterError(
                    f"--sparse-spill-dir {directory}: cannot reserve {total / 2**20:,.0f} MiB for the spill file "
                    f"({e.strerror or e})", "free space there, pick another --sparse-spill-dir, or lower "
                    "--sparse-spill (without a directory spilled blocks stay in host memory)") from None
            os.close(fd)
            self.path = Path(name)
            buf = torch.from_file(name, shared=True, size=total, dtype=torch.uint8)
        else:
            buf = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available()
                              and self.storage.device.type == "cuda")
        offset = 0
        views = []
        for t, shape in shapes:
            n = t.element_size() * torch.Size(shape).numel()
            views.append(buf[offset: offset + n].view(_raw(t).dtype).view(shape))
            offset += n
        it = iter(views)
        for layer in layers:
            data = next(it)
            scales = next(it) if layer.scales is not None else None
            layer.spill = LayerSpill(data, scales, self.first_id)
        return buf

    def close(self) -> None:
        """Detach from the storage and remove the backing file, if any. Safe to call twice."""
        for layer in self.storage.layers:
            layer.spill = None
        self.storage.spill = None
        self._buffer = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def num_free(self) -> int:
        return len(self._free)

    # ---- the KV manager's verbs ---------------------------------------------------------------------
    def spill(self, block_ids: list[int]) -> list[int]:
        """Copy these device blocks (every layer: data, scales, block metadata) to free spill slots; returns
        their spill ids. The caller frees the device blocks and puts the spill ids in their place."""
        n = len(block_ids)
        if n > len(self._free):
            raise RuntimeError(f"{n} blocks to spill, {len(self._free)} spill slots free")
        slots = [self._free.pop() for _ in range(n)]
        src = torch.tensor(block_ids, dtype=torch.long, device=self.storage.device)
        dst = torch.tensor(slots, dtype=torch.long)
        ids = dst + self.first_id
        for layer in self.storage.layers:
            sp = layer.spill
            for dev_t, spill_t in ((layer.data, sp.data), (layer.scales, sp.scales)):
                if dev_t is not None:
                    spill_t.index_copy_(1, dst, _raw(dev_t).index_select(1, src).to(spill_t.device))
            for t in layer.block_meta.values():
                t.index_copy_(0, ids.to(t.device), t.index_select(0, src))
        self.counters["spilled"] += n
        return ids.tolist()

    def free(self, spill_ids: list[int]) -> None:
        """Give spill slots back (their sequence finished or was preempted); every layer forgets what it staged
        from them, so a slot's next owner is never read from a stale staging block."""
        for sid in spill_ids:
            for staged, free in zip(self._staged, self._free_staging):
                block = staged.pop(sid, None)
                if block is not None:
                    free.append(block)
            self._free.append(sid - self.first_id)
        self.counters["freed"] += len(spill_ids)

    # ---- the attention path's verbs -----------------------------------------------------------------
    def begin_step(self) -> None:
        self.clock += 1

    def touch(self, tables: torch.Tensor, picked: bool) -> None:
        """A decode step's tables for one layer: when they are a sparse selector's picks, their blocks were picked
        now (`last_pick`, which orders spilling). A backend that reads spill ids in place calls only this."""
        if picked:
            self.last_pick.index_fill_(0, tables.reshape(-1), self.clock)

    def stage(self, layer_idx: int, tables: torch.Tensor, picked: bool) -> torch.Tensor:
        """A decode step's block tables for one layer [N, K] (any ids) -> the same tables over device ids, the
        picked spilled blocks loaded into the layer's staging blocks; `tables` itself when it holds no spill
        id, or more than the layer can stage (the backend then gathers them: LayerKV.read_blocks). `picked`:
        the tables are a sparse selector's picks (they set `last_pick`, which orders spilling)."""
        self.touch(tables, picked)
        if int(tables.max()) < self.first_id:
            return tables
        need = torch.unique(tables[tables >= self.first_id]).tolist()
        staged, free = self._staged[layer_idx], self._free_staging[layer_idx]
        if len(need) > len(self.staging):
            self.counters["gathers"] += 1
            return tables
        missing = []
        for sid in need:
            if sid in staged:
                staged.move_to_end(sid)
            else:
                missing.append(sid)
        self.counters["hits"] += len(need) - len(missing)
        if missing:
            wanted = set(need)
            while len(free) < len(missing):  # evict the least recently picked staged block not needed now
                victim = next(s for s in staged if s not in wanted)
                free.append(staged.pop(victim))
            blocks = [free.pop() for _ in missing]
            for sid, block in zip(missing, blocks):
                staged[sid] = block
            self._load(layer_idx, missing, blocks)
            m = self._map[layer_idx]
            m.index_copy_(0, torch.tensor(missing, device=m.device), torch.tensor(blocks, device=m.device))
        return self._map[layer_idx][tables]

    def _load(self, layer_idx: int, spill_ids: list[int], blocks: list[int]) -> None:
        """Copy one layer's KV of these spilled blocks into its staging blocks."""
        layer = self.storage[layer_idx]
        sp = layer.spill
        src = torch.tensor(spill_ids, dtype=torch.long) - self.first_id
        dst = torch.tensor(blocks, dtype=torch.long, device=layer.data.device)
        nbytes = 0
        for dev_t, spill_t in ((layer.data, sp.data), (layer.scales, sp.scales)):
            if dev_t is not None:
                rows = spill_t.index_select(1, src)
                nbytes += rows.numel() * rows.element_size()
                _raw(dev_t).index_copy_(1, dst, rows.to(dev_t.device, non_blocking=True))
        self.counters["loads"] += len(spill_ids)
        self.counters["bytes_loaded"] += nbytes

    def stats(self) -> dict:
        """Counters (blocks spilled and freed; per layer: spilled blocks loaded into staging, picks already
        staged, tables gathered instead) and the store's size."""
        return {**self.counters, "slots": self.num_spill, "free": len(self._free), "staging_blocks": len(self.staging),
                "bytes": self.nbytes, "backing": "file" if self.path is not None else "host"}


def plan_spill(page_bytes: int, num_blocks: int, block_size: int, spill_bytes: int, staging_tokens: int,
               keep_blocks: int) -> tuple[int, int]:
    """Split a device budget of `num_blocks` for spilling: (pool blocks the KV manager hands out, spill slots of
    `page_bytes` each in `spill_bytes`); the rest of the budget, ceil(staging_tokens / block_size) blocks, is
    staging. InvalidParameterError when the pool would not hold `keep_blocks` + 1 (what one sequence never
    spills, plus one) or the spill size holds no block."""
    staging = -(-staging_tokens // block_size)
    pool = num_blocks - staging
    if pool < keep_blocks + 1:
        raise InvalidParameterError(
            f"the KV budget of {num_blocks} blocks leaves {pool} for sequences after {staging} staging blocks "
            f"({staging_tokens} tokens), fewer than the {keep_blocks + 1} one sequence keeps on the device",
            "raise --kv-cache-memory or lower --sparse-staging")
    num_spill = spill_bytes // page_bytes
    if num_spill < 1:
        raise InvalidParameterError(f"a spill size of {spill_bytes} bytes holds no block of {page_bytes} bytes",
                                    f"give --sparse-spill at least {page_bytes} bytes")
    return pool, num_spill
