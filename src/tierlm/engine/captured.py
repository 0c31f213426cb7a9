"""Captured decode steps: a pure-decode step replayed from a CUDA graph instead of launched op by op.

At batch 1 a decode step of a small model is hundreds of kernel launches of a few microseconds each; Python
and the launches, not the GPU, set the pace. A CUDA graph records one step's launches once and replays them
with one call. What a replay may change is only the contents of the tensors it was captured with, so:

    static buffers   ids [B], positions [B], slots [B], tables [B, MB], lens [B] (MB: blocks of the longest
                     context), filled from the step's host lists before each replay; logits [B, V] out
    sizes            one graph per padded batch size (1, 2, 4, 8, 16, 24, ... up to max_num_seqs) and table width
                     (64, 256, 1024, ... blocks up to MB, each 4x the last); a step of n rows whose longest table
                     has w blocks runs the smallest size >= n and width >= w, rows n.. padded: token 0 at
                     position 0, writing its K/V to the pad block (one block the KV manager never hands out) and
                     attending over it. The width keeps what a step reads per row near its longest context: the
                     split count of the attention grid and, with a sparse selector, the block scores
    the step         model forward + logits over the static buffers, with the attention metadata built from
                     them inside the captured region (backend.prepare runs on the device at every replay)
    sparse           a capturable selector (Quest, FP8 index keys) picks with static shapes on the device
                     (select(static=True): tables min(MB, budget blocks) wide, no host sync)
    eager            any other step: prefill chunks, more rows than captured, a spill store, a model
                     that reads host-side token context (V4-mini), or a swapped backend (the drift recorders);
                     and everything with --enforce-eager

Only a backend whose decode reads tables and lengths on the device with a grid fixed by shapes can be
captured (AttentionBackend.capturable: the Triton one). Graphs are captured at the first step of each size,
after two warm-up runs on a side stream (Triton compiles, cuBLAS picks its kernels); all sizes share one
memory pool. The warm-up runs write the step's K/V to its slots, as the replay then does again: the same
values, so capturing changes no output.

Without a GPU the same static-buffer path runs with `replay="rerun"` (the tests' stand-in: a replay calls the
step again), and the first run is checked for operations a capture cannot hold (a host sync such as .item(),
or an output whose shape depends on values, such as nonzero): `check_capturable`.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tierlm.attention import AttentionContext, AttentionMetadata
from tierlm.core.errors import InvalidParameterError

if TYPE_CHECKING:
    from tierlm.engine.model_runner import ModelRunner, StepLayout

log = logging.getLogger(__name__)

# aten ops a CUDA graph cannot capture: a device-to-host read of a value, an output shaped by values, or a tensor
# made from host data (torch.tensor(list): a blocking host-to-device copy on CUDA).
UNCAPTURABLE = frozenset({
    "aten.lift_fresh",
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.is_nonzero", "aten.equal",
    "aten.allclose", "aten.bincount", "aten.repeat_interleave.Tensor", "aten.nonzero_static_fallback",
})


def table_widths(max_blocks: int, first: int = 64, factor: int = 4) -> list[int]:
    """The captured table widths: first, first * factor, ... below max_blocks, then max_blocks."""
    out, w = [], first
    while w < max_blocks:
        out.append(w)
        w *= factor
    return out + [max_blocks]


def default_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = {s for s in (1, 2, 4) if s <= max_num_seqs} | set(range(8, max_num_seqs + 1, 8)) | {max_num_seqs}
    return sorted(sizes)


class _Checker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        full = f"{name}.{func._overloadname}" if func._overloadname != "default" else name
        if name in UNCAPTURABLE or full in UNCAPTURABLE:
            self.found.append(full)
        if name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] if len(args) > 1 else ()) if i is not None):
            self.found.append("aten.index with a boolean mask")
        return func(*args, **(kwargs or {}))


def check_capturable(fn: Callable[[], object]):
    """Run fn() and return (its result, the uncapturable operations it ran: [] when a graph can hold it)."""
    with _Checker() as checker:
        result = fn()
    return result, sorted(set(checker.found))


class _Rerun:
    """replay="rerun": the stand-in for a CUDA graph where there is none; a replay runs the step again on the
    static buffers and copies its logits into the static output."""

    def __init__(self, step: Callable[[], torch.Tensor], out: torch.Tensor):
        self.step, self.out = step, out

    def replay(self) -> None:
        self.out.copy_(self.step())


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, sizes: Sequence[int], max_blocks: int, pad_block: int,
                 replay: str = "cuda"):
        if replay not in ("cuda", "rerun"):
            raise ValueError(f"replay {replay!r}: use cuda or rerun")
        if not sizes or min(sizes) < 1:
            raise InvalidParameterError(f"captured batch sizes {list(sizes)} must be positive",
                                        "give sizes such as 1 2 4 8 16")
        self.runner = runner
        self.backend = runner.backend  # what the graphs hold; a swapped runner.backend runs eager
        self.sizes = sorted(set(sizes))
        self.max_blocks = max_blocks
        self.widths = table_widths(max_blocks)
        self.pad_block = pad_block
        self.replay_mode = replay
        dev, b = runner.device, self.sizes[-1]
        bs = runner.block_size
        self.pad_slot = pad_block * bs
        self.ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slots = torch.full((b,), self.pad_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((b, max_blocks), pad_block, dtype=torch.long, device=dev)
        self.lens = torch.ones(b, dtype=torch.long, device=dev)
        # host staging, one row per batch row: id, position, slot, length, then the block table. Pinned on CUDA (one
        # non-blocking copy a step); every entry always a valid block id (stale columns past a row's blocks are read
        # by nothing that matters: the kernels stop at the row's length, a selector's scores mask them out)
        self._host = torch.full((b, 4 + max_blocks), pad_block, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._np = self._host.numpy()
        self.graphs: dict[tuple[int, int], object] = {}  # (batch size, table width) -> graph
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.counters = {"replays": 0}  # captures: len(self.graphs)
        self._pool = None

    def accepts(self, lay: StepLayout, runner: ModelRunner) -> bool:
        """Whether this step runs from a graph (see the module docstring for what runs eager)."""
        return (bool(lay.ids) and lay.decode_only and len(lay.ids) <= self.sizes[-1]
                and runner.backend is self.backend and runner.kv.spill is None
                and runner.token_context is None)  # tables never pass max_blocks: the context is capped there

    def run(self, lay: StepLayout) -> torch.Tensor:
        """Replay the graph of the smallest captured size >= the step's rows and width >= its longest table ->
        logits [n, V] (a copy: the next replay overwrites the graph's output)."""
        n, longest = len(lay.ids), max(map(len, lay.decode_tables))
        key = (self.sizes[bisect.bisect_left(self.sizes, n)], self.widths[bisect.bisect_left(self.widths, longest)])
        self._fill(lay, key[0], longest)
        graph = self.graphs.get(key) or self._capture(key)
        graph.replay()
        self.counters["replays"] += 1
        return self.logits[key][:n].clone()

    def _fill(self, lay: StepLayout, b: int, width: int) -> None:
        """The step's rows into the static buffers (rows n..b padded): numpy writes into the staging rows, then
        one copy of the columns in use (`width`: the widest table's) to the device."""
        n, h = len(lay.ids), self._np
        h[:n, 0], h[:n, 1], h[:n, 2], h[:n, 3] = lay.ids, lay.positions, lay.slots, lay.decode_lens
        h[n:b, :5] = (0, 0, self.pad_slot, 1, self.pad_block)
        for i, t in enumerate(lay.decode_tables):
            h[i, 4:4 + len(t)] = t
        rows = self._host[:b, :4 + width]
        dev = rows.to(self.runner.device, non_blocking=True) if self.runner.device.type == "cuda" else rows
        self.ids[:b].copy_(dev[:, 0])
        self.positions[:b].copy_(dev[:, 1])
        self.slots[:b].copy_(dev[:, 2])
        self.lens[:b].copy_(dev[:, 3])
        self.tables[:b, :width].copy_(dev[:, 4:])

    def _step(self, key: tuple[int, int]) -> torch.Tensor:
        """The captured function for (batch size, table width): reads the static buffers only."""
        r, (b, w) = self.runner, key
        meta = AttentionMetadata(block_size=r.block_size, slot_mapping=self.slots[:b], num_decodes=b,
                                 decode_block_tables=self.tables[:b, :w], decode_seq_lens=self.lens[:b])
        self.backend.prepare(meta, r.num_ids)
        ctx = AttentionContext(meta, r.kv, self.backend, r.selector, captured=True)
        hidden = r.model(self.ids[:b], self.positions[:b], ctx)
        return r.model.compute_logits(hidden)

    def _capture(self, key: tuple[int, int]):
        t0 = time.perf_counter()
        graph = self._capture_rerun(key) if self.replay_mode == "rerun" else self._capture_cuda(key)
        log.info("decode step captured for batch size %d, tables %d blocks wide, in %.2f s (%d graphs)", *key,
                 time.perf_counter() - t0, len(self.graphs))
        return graph

    def _capture_rerun(self, key: tuple[int, int]):
        out, bad = check_capturable(lambda: self._step(key))
        if bad:
            raise RuntimeError(f"the decode step runs operations a CUDA graph cannot capture: {', '.join(bad)}")
        self.logits[key] = out
        self.graphs[key] = _Rerun(lambda: self._step(key), out)
        return self.graphs[key]

    def _capture_cuda(self, key: tuple[int, int]):
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(key)
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the tier loader and the drift guard's worker keep using their own streams during a capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.logits[key] = self._step(key)
        self._pool = graph.pool()
        self.graphs[key] = graph
        return graph
