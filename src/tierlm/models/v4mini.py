"""V4-mini: tierlm's own model family, Llama blocks plus Engram conditional memory at configured layers.

Before each Engram layer i the residual stream h gets the layer's memory branch (models/engram.py) added:
h <- h + Engram_i(h, rows_i), where rows_i are the table rows the token's hashed 2- and 3-grams address
(tierlm.memory). The rows depend on token ids alone, so the engine hands ids over as early as it knows them and a
worker thread gathers the rows while other work runs: a decode token as soon as it is sampled (`prefetch_ahead`,
while the engine detokenizes, checks stops and schedules the next step), every other token when the step is laid
out (`begin_step`). `prefetch_mode` ("auto", "ahead", "step", "off": EngineConfig.engram_prefetch) says which of these
run. On a CPU the worker competes with the forward pass for the same cores (an OpenMP region waits for its slowest
thread), so "auto" prefetches there only steps of at most CPU_PREFETCH_TOKENS tokens, where the gather is latency,
not work, and looks the rest up in the layer; on CUDA it prefetches ahead (docs/experiments.md, section 3b).

Checkpoint (a Hugging Face-style directory every tierlm command loads):
    config.json        model_type "v4mini", Llama keys, "engram": {EngramConfig fields}, "attention_type"
    model.safetensors  Llama names plus model.layers.{i}.engram.{w_k.weight, w_v.weight, norm_h.weight,
                       norm_k.weight, conv}
    engram.safetensors model.layers.{i}.engram.table [rows, row_dim] per Engram layer (served memory-mapped in
                       place, copied to host memory, or onto the device: `place_tables`)
    engram_map.json    the tokenizer compression map (memory/hashing.py), when engram.num_ids > 0
    tokenizer.json

Attention is pluggable: `attention_type` names an entry of ATTENTION_TYPES (today "gqa", the Llama attention
over the paged KV); DeepSeek V4's attention (window + compressed KV + indexer + sink) joins as another entry.

The conv's state in the engine: each Engram layer's gated value of every token is kept paged beside the KV, as
per-block metadata of that layer (config.ENGRAM_STATE; kvcache/spec.py counts its bytes), so a prefix-cache hit, a tier load or an
offloaded preemption restores it with the KV, and a step reads the (kernel - 1) earlier values through the
block table (`tap slots`, built by the model runner).
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.config import ENGRAM_PREFETCH_MODES, ENGRAM_STATE, ModelConfig
from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.memory.hashing import layer_hasher
from tierlm.memory.prefetch import Prefetcher
from tierlm.memory.storage import BACKENDS, EngramTable
from tierlm.models.dense import DenseContext
from tierlm.models.engram import EngramLayer
from tierlm.models.llama import Attention, LlamaForCausalLM

ATTENTION_TYPES: dict[str, type] = {"gqa": Attention}
CPU_PREFETCH_TOKENS = 2  # "auto" on a CPU: steps with more tokens look their rows up in the layer
TOKEN_MAP = "model.engram.token_map"


def table_name(layer: int) -> str:
    return f"model.layers.{layer}.engram.table"


@dataclass
class _Part:
    """Rows for some of a step's tokens: per Engram layer a prefetch ticket (or, with prefetch off, the normalized
    (ids, history) to look up in the layer); `dst`: the step positions they fill (None: all, in order); `src`: the
    rows of the ticket's batch each takes (None: the batch is exactly `dst`)."""
    tickets: dict[int, Future | tuple[torch.Tensor, torch.Tensor]]
    dst: torch.Tensor | None = None
    src: torch.Tensor | None = None


@dataclass
class _Ahead:
    """Rows handed over before their step: the batch's tickets and, per token, its key (earlier ids + id) -> index.
    A row is a function of that key alone, so a step takes any of its tokens whose key is here."""
    keys: dict[tuple[int, ...], int]
    tickets: dict[int, Future | tuple[torch.Tensor, torch.Tensor]]


class V4MiniForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_for(cls, cfg: ModelConfig) -> type:
        if cfg.attention_type not in ATTENTION_TYPES:
            raise UnsupportedModelError(f"attention_type {cfg.attention_type!r} is not implemented",
                                        f"use one of {', '.join(ATTENTION_TYPES)}")
        return ATTENTION_TYPES[cfg.attention_type]

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        if cfg.engram is None:
            raise CorruptModelError("a v4mini config.json needs an \"engram\" block", "add engram.layers to it")
        super().__init__(cfg, max_positions)
        e = cfg.engram
        self.engram_layers = tuple(sorted(e.layers))
        self.hashers = {i: layer_hasher(e, i, cfg.vocab_size) for i in self.engram_layers}
        self.engram = nn.ModuleDict({str(i): EngramLayer(cfg.hidden_size, e.slots, e.row_dim, cfg.rms_norm_eps,
                                                         e.conv_kernel, max(e.orders), e.conv)
                                     for i in self.engram_layers})
        # Training holds the tables as parameters (their own optimizer group); serving as EngramTables (below).
        self.engram_tables = nn.ParameterDict({str(i): nn.Parameter(torch.empty(h.total_rows, e.row_dim))
                                               for i, h in self.hashers.items()})
        self.register_buffer("token_map", torch.arange(cfg.vocab_size), persistent=False)
        self.tables: dict[int, EngramTable] = {}
        self.prefetch_mode = "ahead"  # ENGRAM_PREFETCH_MODES: see the module docstring
        self._max_prefetch: int | None = None  # steps with more tokens are looked up in the layer (None: no limit)
        self._prefetchers: dict[int, Prefetcher] = {}
        self._step = None
        self._ahead: _Ahead | None = None
        # tokens whose rows were prefetched from a hand-off, prefetched at step layout, looked up in the layer
        self.fetched = {"ahead": 0, "step": 0, "layer": 0}
        self._sync_s: dict[int, float] = {}  # prefetch off: seconds of lookups in the layer

    # ---- what the engine hands over --------------------------------------------------------------
    @property
    def token_context(self) -> tuple[int, tuple[int, ...]]:
        """(earlier token ids each position's N-grams read, how far back the conv reads gated values)."""
        e = self.config.engram
        return e.history, e.taps

    def add_kv_meta(self, storage) -> None:
        """Room for the Engram layers' gated values beside their KV (the conv's state), when there is a conv."""
        if self.config.engram.conv:
            storage.add_block_meta(ENGRAM_STATE, (storage.spec.block_size, self.config.hidden_size), torch.float32,
                                   layers=self.engram_layers)

    def normalized(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (-1: before the sequence's start) -> normalized ids (the padding id for -1)."""
        pad = self.hashers[self.engram_layers[0]].num_ids
        ids = ids.to(self.token_map.device)
        return torch.where(ids < 0, pad, self.token_map[ids.clamp(min=0)]).cpu()

    def _prefetches(self, tokens: int) -> bool:
        return self.prefetch_mode != "off" and (self._max_prefetch is None or tokens <= self._max_prefetch)

    def _submit(self, input_ids: torch.Tensor, history: torch.Tensor, sync: bool = False) -> dict:
        """Tokens [T] and their earlier ids [T, history] (raw, -1 before the start) -> per Engram layer a ticket
        (`sync`: the normalized ids, looked up in the layer)."""
        if not self.tables:
            raise RuntimeError("V4-mini tables are not placed: build the model through build_model / load_weights")
        ids, hist = self.normalized(input_ids)[:, None], self.normalized(history)
        tickets = {}
        for i in self.engram_layers:
            if sync:
                tickets[i] = (ids, hist)
                continue
            pf = self._prefetchers.get(i)
            if pf is None:
                pf = self._prefetchers[i] = Prefetcher(self.tables[i], self.hashers[i], input_ids.device)
            tickets[i] = pf.submit(ids, hist)
        return tickets

    def prefetch_ahead(self, input_ids: torch.Tensor, history: torch.Tensor) -> None:
        """The next step's decode tokens [N] and their earlier ids [N, history], handed over as soon as they are
        sampled: their rows are gathered while the engine finishes this step and schedules the next."""
        if self.prefetch_mode not in ("ahead", "auto") or not len(input_ids) or not self._prefetches(len(input_ids)):
            return
        keys = torch.cat([history, input_ids[:, None]], 1).tolist()
        self._ahead = _Ahead({tuple(k): j for j, k in enumerate(keys)}, self._submit(input_ids, history))

    def begin_step(self, input_ids: torch.Tensor, history: torch.Tensor, tap_slots: torch.Tensor | None) -> None:
        """A step's tokens [T], each token's earlier ids [T, history] (-1 before the start) and the slots of its
        earlier gated values [T, kernel - 1] (-1 before the start). Tokens handed over ahead take those rows; the
        rest are submitted for prefetch now (or, where this step is not prefetched, looked up in the layer)."""
        ahead, self._ahead = self._ahead, None
        T, parts, todo = input_ids.shape[0], [], None
        if ahead is not None and T:
            idx = [ahead.keys.get(tuple(k), -1) for k in torch.cat([history, input_ids[:, None]], 1).tolist()]
            hit = [t for t, j in enumerate(idx) if j >= 0]
            if hit:
                parts.append(_Part(ahead.tickets, torch.tensor(hit), torch.tensor([idx[t] for t in hit])))
                todo = torch.tensor([t for t, j in enumerate(idx) if j < 0], dtype=torch.long)
        sync = not self._prefetches(T)
        if todo is None:
            parts.append(_Part(self._submit(input_ids, history, sync)))
        elif todo.numel():
            parts.append(_Part(self._submit(input_ids[todo], history[todo], sync), todo))
        late = T if todo is None else todo.numel()
        self.fetched["ahead"] += T - late
        self.fetched["layer" if sync else "step"] += late
        self._step = (parts, tap_slots)

    def fetch_stats(self) -> dict[int, dict[str, float]]:
        """Per Engram layer: `fetch_s`, seconds spent hashing and gathering rows (on the worker, or in the layer with
        prefetch off), and `wait_s`, the part the forward pass waited for (all of it with prefetch off)."""
        out = {}
        for i in self.engram_layers:
            pf, sync = self._prefetchers.get(i), self._sync_s.get(i, 0.0)
            out[i] = {"fetch_s": sync + (pf.fetch_s if pf else 0.0), "wait_s": sync + (pf.wait_s if pf else 0.0)}
        return out

    def close(self) -> None:
        self._ahead = None
        for pf in self._prefetchers.values():
            pf.close()
        self._prefetchers.clear()
        for t in self.tables.values():
            t.close()

    # ---- forward ---------------------------------------------------------------------------------
    def _native_decode(self, x, rope, ctx):
        return None  # the native decode step runs Llama layers only

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions)
        step, self._step = self._step, None
        dense = isinstance(ctx, DenseContext)
        if not dense and step is None:
            raise RuntimeError("the engine calls begin_step before a V4-mini forward pass (model_runner.py)")
        residual = None
        for i, layer in enumerate(self.layers):
            if str(i) in self.engram:
                h = x if residual is None else x + residual
                branch = self._dense_engram(i, h, input_ids, ctx) if dense else self._paged_engram(i, h, step, ctx)
                x, residual = branch, h
            x, residual = layer(x, residual, rope, ctx)
        return self.norm(x, residual)[0]

    def _rows(self, i: int, row_ids: torch.Tensor) -> torch.Tensor:
        """Table rows [..., slots] -> [..., slots, row_dim]: differentiable from the parameter while training."""
        if not self.tables:
            return F.embedding(row_ids, self.engram_tables[str(i)])
        return self.tables[i].gather(row_ids, self.embed_tokens.weight.device).view(*row_ids.shape, -1)

    def _step_rows(self, i: int, parts: list[_Part], T: int) -> torch.Tensor:
        """Layer i's rows for the step's T tokens [T, ...], assembled from the parts that fetched them."""
        out = None
        for part in parts:
            ticket = part.tickets[i]
            if isinstance(ticket, Future):
                rows = self._prefetchers[i].get(ticket)
            else:  # prefetch off: the whole lookup is on the critical path
                t0 = time.perf_counter()
                rows = self._rows(i, self.hashers[i].row_ids(*ticket))
                self._sync_s[i] = self._sync_s.get(i, 0.0) + time.perf_counter() - t0
            if part.src is not None:
                rows = rows[part.src]
            if part.dst is None:
                return rows
            if out is None:
                out = rows.new_empty((T, *rows.shape[1:]))
            out[part.dst] = rows
        return out

    def _dense_engram(self, i: int, h: torch.Tensor, input_ids: torch.Tensor, ctx: DenseContext) -> torch.Tensor:
        B, T = ctx.batch, ctx.seq_len
        row_ids = self.hashers[i].row_ids(self.normalized(input_ids).view(B, T)).to(h.device)
        out, _ = self.engram[str(i)](h.view(B, T, -1), self._rows(i, row_ids))
        return out.reshape(B * T, -1)

    def _paged_engram(self, i: int, h: torch.Tensor, step, ctx) -> torch.Tensor:
        parts, tap_slots = step
        e = self._step_rows(i, parts, h.shape[0])
        layer = self.engram[str(i)]
        out = layer.branch(h, e.reshape(h.shape[0], -1).to(h.device))
        if layer.conv is None:
            return out
        values = ctx.kv[i].block_meta[ENGRAM_STATE].view(-1, h.shape[-1])  # [ids x block_size, hidden]
        values.index_copy_(0, ctx.meta.slot_mapping, out.float())
        taps = tap_slots.to(h.device)
        earlier = values[taps.clamp(min=0)] * (taps >= 0).unsqueeze(-1)  # [T, kernel - 1, hidden]
        return layer.conv_mix(out, earlier.to(out.dtype))

    # ---- weights ---------------------------------------------------------------------------------
    def _load_extra(self, take, put) -> None:
        e = self.config.engram
        for i in self.engram_layers:
            p, m = f"model.layers.{i}.engram.", f"engram.{i}."
            for name in ("w_k.weight", "w_v.weight", "norm_h.weight", "norm_k.weight") + (("conv",) if e.conv else ()):
                put(m + name, take(p + name))
            table = take(table_name(i))
            expected = (self.hashers[i].total_rows, e.row_dim)
            if tuple(table.shape) != expected:
                raise CorruptModelError(f"Engram table of layer {i} is {tuple(table.shape)}, the config implies "
                                        f"{expected}", "the tables belong to another config: re-export the model")
            self.tables[i] = EngramTable(table, "mmap")
        self.engram_tables = nn.ParameterDict()
        if e.num_ids:
            token_map = take(TOKEN_MAP).to(torch.int64)
            if token_map.shape != (self.config.vocab_size,) or int(token_map.max()) >= e.num_ids:
                raise CorruptModelError(f"the Engram token map does not map {self.config.vocab_size} ids into "
                                        f"{e.num_ids}", "rebuild engram_map.json from this model's tokenizer")
            self.token_map = token_map.to(self.embed_tokens.weight.device)
        else:
            self.token_map = torch.arange(self.config.vocab_size, device=self.embed_tokens.weight.device)

    def place_tables(self, backend: str, device: torch.device | str, prefetch: str = "auto",
                     source: str | Path | None = None) -> None:
        """Serve the tables from `backend`: "mmap" (the checkpoint file, mapped in place), "host" (a copy in host
        memory, pinned on CUDA) or "device" (a copy on the compute device), with rows gathered as `prefetch` says.
        `source`: the engram.safetensors file the tables were loaded from; mmap maps it again itself, which lets a
        gather ask the kernel for all of a step's pages at once (EngramTable.advise)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown Engram table backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if prefetch not in ENGRAM_PREFETCH_MODES:
            raise ValueError(f"unknown Engram prefetch mode {prefetch!r}; use one of {', '.join(ENGRAM_PREFETCH_MODES)}")
        self.close()
        self.prefetch_mode = prefetch
        cpu = torch.device(device).type == "cpu"
        self._max_prefetch = CPU_PREFETCH_TOKENS if prefetch == "auto" and cpu else None
        for i, t in self.tables.items():
            data = t.data
            if backend == "device":
                data = data.to(device, copy=True)
            elif backend == "host":
                data = data.to("cpu", copy=True)
                if torch.cuda.is_available():
                    data = data.pin_memory()
            elif t.backend != "mmap":
                raise ValueError("tables already copied off their file cannot go back to mmap: reload the model")
            elif source is not None:
                self.tables[i] = EngramTable.from_safetensors(source, table_name(i), "mmap", shape=tuple(data.shape))
                continue
            self.tables[i] = EngramTable(data, backend, t.path, t.offset)

    def export_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the Engram layers' parameters, the tables) in checkpoint names, from a model that trains."""
        params, tables = {}, {}
        for i in self.engram_layers:
            for name, t in self.engram[str(i)].named_parameters():
                params[f"model.layers.{i}.engram.{name}"] = t.detach()
            tables[table_name(i)] = (self.tables[i].data if self.tables else self.engram_tables[str(i)]).detach()
        return params, tables
