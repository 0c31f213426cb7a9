"""The attention-backend seam: one interface, implementations chosen once per engine by the model runner.

    runner:  backend = select_backend(config.attention_backend, device, dtype, kv_format)   # once
             per step: meta = <built from the schedule>; backend.prepare(meta, num_blocks)
             ctx = AttentionContext(meta, kv_storage, backend); model(input_ids, positions, ctx)
    model:   each attention layer calls ctx.forward(layer_idx, q, k, v, scale)
             -> k, v = backend.write_kv(layer, k, v, meta); backend.attend(q, k, v, layer, meta, scale)

A backend owns how K/V are written into a layer's storage and how the step's queries attend over the
paged context; it never owns the KV tensors (kvcache.KVStorage does) and keeps no state between steps
beyond what `prepare` derived for the current one. An FP8 KV format is a format the storage knows
(LayerKV.write_slots quantizes on write, LayerKV.read_blocks dequantizes a gather); a backend either reads
through those (torch) or reads the FP8 bytes in place (the cpu backend's native decode kernel). A sparse
selector adds per-sequence block picks to the metadata that `attend` honours.

Backends register in BACKENDS (name -> class). `select_backend("auto", ...)` takes the first registered
backend, in PREFERENCE order, whose `unsupported(...)` returns None.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from tierlm.attention.metadata import AttentionMetadata
from tierlm.core.errors import InvalidParameterError

if TYPE_CHECKING:
    from tierlm.kvcache.storage import KVStorage, LayerKV


class AttentionBackend(ABC):
    """Writes a step's new K/V into paged storage and attends over each sequence's context."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Whether decode reads spill ids (kvcache/spill.py) where they are; else the picks are staged on the device.
    reads_spill_in_place: ClassVar[bool] = False
    # Whether a decode step through it can be captured in a CUDA graph (engine/captured.py): prepare and decode
    # read the metadata tensors on the device only, with no host sync and launch shapes fixed by tensor shapes.
    capturable: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, device: torch.device, dtype: torch.dtype, kv_format: str) -> str | None:
        """Why this backend cannot run on (device, compute dtype, KV format), or None when it can."""
        return None

    def prepare(self, meta: AttentionMetadata, num_blocks: int) -> None:
        """Derive per-step state (indices, masks) once for all layers; stored in meta.backend_state."""

    def write_kv(self, layer: LayerKV, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [T, Hkv, D] (the step's new tokens) -> their cache slots meta.slot_mapping: [T] (quantized
        there for FP8 formats). Returns k, v as the cache holds them (LayerKV.write_slots), which `attend`
        gets: a lossy format is then the same whether a token is fresh or read back."""
        return layer.write_slots(meta.slot_mapping, k, v)

    def with_decode_tables(self, meta: AttentionMetadata, tables: torch.Tensor, lens: torch.Tensor,
                           num_blocks: int) -> AttentionMetadata:
        """`meta` with other decode block tables and lengths (a sparse selector's picks for one layer), the
        prefill part and its derived state kept."""
        return dataclasses.replace(meta, decode_block_tables=tables, decode_seq_lens=lens, backend_state=None)

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """q: [T, Hq, D] (decodes first) -> out [T, Hq, D]. k, v: [T, Hkv, D], the step's new K/V as
        write_kv stored them (a backend may use them directly instead of reading them back)."""


@dataclass
class AttentionContext:
    """Everything a model's attention layers need for one step, passed explicitly (no globals)."""

    meta: AttentionMetadata
    kv: KVStorage
    backend: AttentionBackend
    selector: object = None  # attention.sparse.QuestSelector, or None (dense)
    captured: bool = False  # the step is being captured in a CUDA graph: picks keep static shapes, no host sync

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write layer `layer_idx`'s new K/V, then attend: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. With
        a sparse selector, the layer's decode rows read only the blocks it picks."""
        layer = self.kv[layer_idx]
        meta = self.meta
        k, v = self.backend.write_kv(layer, k, v, meta)
        sel = self.selector
        tables, lens = meta.decode_block_tables, meta.decode_seq_lens
        picked = False
        if sel is not None and sel.applies(layer_idx):
            sel.on_write(layer, meta.slot_mapping, k, meta.block_size, sync_free=self.captured or None)
            if meta.num_decodes:
                picks = sel.select(q[: meta.num_decodes], layer, tables, lens, scale, static=self.captured)
                tables, lens, picked = picks.block_tables, picks.seq_lens, True
        spill = self.kv.spill
        if spill is not None and meta.num_decodes:
            if self.backend.reads_spill_in_place:
                spill.touch(tables, picked)
            else:  # spilled blocks the decode rows read: loaded into this layer's staging blocks (kvcache/spill.py)
                tables = spill.stage(layer_idx, tables, picked)
        if tables is not meta.decode_block_tables:
            meta = self.backend.with_decode_tables(meta, tables, lens, self.kv.num_ids)
        return self.backend.attend(q, k, v, layer, meta, scale)


BACKENDS: dict[str, type[AttentionBackend]] = {}
PREFERENCE: list[str] = []  # order "auto" tries


def register_backend(cls: type[AttentionBackend], preferred: bool = False) -> type[AttentionBackend]:
    BACKENDS[cls.name] = cls
    if preferred:
        PREFERENCE.insert(0, cls.name)
    else:
        PREFERENCE.append(cls.name)
    return cls


def select_backend(name: str, device: torch.device, dtype: torch.dtype, kv_format: str) -> AttentionBackend:
    """The backend `name` ("auto": the first in PREFERENCE that runs here). InvalidParameterError when a
    named backend is unknown or cannot run on this device, dtype and KV format."""
    if name == "auto":
        for candidate in PREFERENCE:
            if BACKENDS[candidate].unsupported(device, dtype, kv_format) is None:
                return BACKENDS[candidate]()
        raise InvalidParameterError(f"no attention backend runs {kv_format} KV on {device} in {dtype}",
                                    "use another --dtype or KV format")
    cls = BACKENDS.get(name)
    if cls is None:
        raise InvalidParameterError(f"unknown attention backend {name!r}", f"use auto or one of {', '.join(BACKENDS)}")
    reason = cls.unsupported(device, dtype, kv_format)
    if reason is not None:
        raise InvalidParameterError(f"attention backend {name!r} cannot run here: {reason}",
                                    "use --attention-backend auto")
    return cls()
