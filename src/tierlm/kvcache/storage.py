"""KVStorage: the KV tensors of every layer, owned by the KV cache (not by the model runner).

One `LayerKV` per layer, allocated once from the KVSpec:

    data        [2 (K, V), num_blocks, block_size, Hkv, D]  in the format's storage dtype
    scales      None for unscaled formats (fp32, bf16, fp16) and static FP8; FP8 with per-token scales adds
                [2, num_blocks, block_size, Hkv, groups] scales here (fp32, or uint8 UE8M0 exponents)
    static_scales  static FP8 only: [2, Hkv] fp32, one calibrated scale per K/V and head for the layer
                (not per block, so not one of `parts()`; the format's identity names the calibration)
    block_meta  per-block metadata by name, dim 0 = block id, e.g. Quest's key_min / key_max
                [num_ids, Hkv, D] (filled by the component that registers them)
    spill       None, or the layer's part of a SpillStore (kvcache/spill.py): the KV of blocks spilled
                out of the device pool, ids [num_blocks, num_ids), in host memory or a mapped file

Block ids handed out by the KV manager index dim 1 of `data` directly (dim 0 of the other parts). With
spilled blocks (sparse decoding over contexts larger than the pool) a block table may also hold spill ids
>= num_blocks: block metadata has a row for them (on the device) and `read_blocks` gathers them from the
spill store; everything else (writes, the tier verbs, the native decode kernels) takes device ids only.
Layout stays per layer, not block-major: every attention kernel reads one layer's blocks at a time,
so a layer's K (or V) rows of a block are contiguous and a decode kernel walks a block table in place;
a block-major layout ([num_blocks, L, ...]) would make each block one contiguous range across layers
(one memcpy per block for a tier transfer) at the price of striding every attention read by the
layer count. Tier transfers instead go through the batched verbs below, which move many blocks of
every layer with one index op per layer and part, into a block-major buffer:

    parts = storage.gather_blocks(ids, device="cpu", pin_memory=True)   # {"data": [n, L, 2, bs, Hkv, D], ...}
    storage.scatter_blocks(other_ids, parts)                               # the same KV, at other blocks
    storage.copy_blocks(src_ids, dst_ids)                                  # device to device

In a gathered buffer, dim 0 is the block: `parts[name][i]` is block ids[i]'s payload, contiguous, so a
tier stores or sends one block (or a run of blocks) as one byte range.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tierlm.kvcache.spec import KVSpec
from tierlm.quant.fp8 import Fp8Scheme, dequantize, dequantize_kv_rows, quantize_kv


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A view the index ops accept: 1-byte float formats (FP8) as uint8 (torch's CPU index_copy_ has no fp8)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype.is_floating_point else t


@dataclass
class LayerSpill:
    """One layer's spilled blocks (kvcache/spill.py): data [2, num_spill, block_size, Hkv, D] and scales like
    LayerKV's, off the device (host memory or a mapped file); spill id i is row i - first_id."""

    data: torch.Tensor
    scales: torch.Tensor | None
    first_id: int


@dataclass
class LayerKV:
    """One layer's paged KV: data, optional scales, optional per-block metadata (see the module docstring)."""

    data: torch.Tensor
    scales: torch.Tensor | None = None
    block_meta: dict[str, torch.Tensor] = field(default_factory=dict)
    static_scales: torch.Tensor | None = None  # static FP8: [2, Hkv] fp32 per layer (not per block)
    scheme: Fp8Scheme | None = None  # FP8 formats: how data and scales are read (tierlm.quant.fp8)
    spill: LayerSpill | None = None

    @property
    def num_ids(self) -> int:
        """The block id space: device blocks, then spill ids."""
        return self.data.shape[1] + (self.spill.data.shape[1] if self.spill is not None else 0)

    def read_blocks(self, index: torch.Tensor, widen=None) -> torch.Tensor:
        """K/V blocks by an index into the [2 * num_ids] view (K blocks, then V blocks: attention's
        metadata.kv_index with N = num_ids) -> [len(index), block_size, Hkv, D] in a dtype attention computes
        in: the stored values as they are, or FP8 dequantized to fp32 with its scales (the reference
        dequantization; `widen`, a faster FP8 -> fp32 conversion of the bytes, see quant.fp8._widen).
        Spill ids are gathered from the spill store (a copy to the device)."""
        _, nb, bs, h, d = self.data.shape
        if self.spill is not None:
            rows, scales, is_v = self._read_spilled(index)
        else:
            rows = _raw(self.data).view(2 * nb, bs, h, d).index_select(0, index)
            scales = None
            if self.scales is not None:
                scales = self.scales.view(2 * nb, bs, h, -1).index_select(0, index)
            is_v = index >= nb
        if self.scheme is None:
            return rows
        return dequantize_kv_rows(rows, scales, self.scheme, self.static_scales, is_v, widen)

    def _read_spilled(self, index: torch.Tensor):
        """read_blocks' gather over device blocks and spilled ones: (raw rows, raw scales or None, is_v)."""
        _, nb, bs, h, d = self.data.shape
        sp = self.spill
        ns = sp.data.shape[1]
        n_ids = nb + ns
        is_v = index >= n_ids
        bid = index - is_v.long() * n_ids
        spilled = bid >= nb
        on_dev = (~spilled).nonzero().squeeze(1)
        off_dev = spilled.nonzero().squeeze(1)
        dev_rows = (bid + is_v.long() * nb).index_select(0, on_dev)
        spill_rows = (bid - nb + is_v.long() * ns).index_select(0, off_dev).cpu()
        out = []
        for dev_t, spill_t in ((self.data, sp.data), (self.scales, sp.scales)):
            if dev_t is None:
                out.append(None)
                continue
            dv = _raw(dev_t).view(2 * nb, bs, h, -1)
            rows = dv.new_empty((len(index), *dv.shape[1:]))
            rows.index_copy_(0, on_dev, dv.index_select(0, dev_rows))
            if len(off_dev):
                sv = _raw(spill_t).view(2 * ns, bs, h, -1)
                rows.index_copy_(0, off_dev, sv.index_select(0, spill_rows).to(rows.device))
            out.append(rows)
        return out[0], out[1], is_v

    def write_slots(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the K/V of T new tokens ([T, Hkv, D] each) at cache slots [T] (block * block_size + offset),
        quantizing on the way in for FP8 formats. Returns (k, v) as the cache now holds them (FP8: their
        dequantized values, fp32), so attention over the new tokens sees exactly what a later read of the
        cache will: outputs then never depend on whether a token was just computed or read back (chunk
        borders, prefix-cache and tier hits)."""
        _, nb, bs, h, d = self.data.shape
        kv = torch.stack((k, v))
        if self.scheme is None:
            self.data.view(2, nb * bs, h, d).index_copy_(1, slots, kv.to(self.data.dtype))
            return k, v
        data, scales = quantize_kv(kv, self.scheme, self.static_scales)
        _raw(self.data).view(2, nb * bs, h, d).index_copy_(1, slots, data)
        if scales is not None:
            self.scales.view(2, nb * bs, h, -1).index_copy_(1, slots, scales)
        if scales is not None:
            held = dequantize(data, scales, self.scheme)
        else:  # static: row 0 is K, row 1 is V
            held = dequantize_kv_rows(data, None, self.scheme, self.static_scales,
                                      torch.arange(2, device=data.device) == 1)  # no host data: capturable
        return held[0], held[1]

    def parts(self) -> dict[str, tuple[torch.Tensor, int]]:
        """name -> (tensor, its block dim), for every tensor that holds per-block state."""
        out = {"data": (self.data, 1)}
        if self.scales is not None:
            out["scales"] = (self.scales, 1)
        for name, t in self.block_meta.items():
            out[f"meta.{name}"] = (t, 0)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _ in self.parts().values())


class KVStorage:
    """The device KV cache: `num_blocks` blocks of `spec.block_size` tokens in every layer."""

    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str, num_spill: int = 0):
        if num_blocks < 1:
            raise ValueError(f"num_blocks {num_blocks} < 1")
        self.spec = spec
        self.num_blocks = num_blocks
        self.num_ids = num_blocks + num_spill  # block ids: device blocks, then spill ids (kvcache/spill.py)
        self.spill = None  # the SpillStore over this storage, once one is built
        self.device = torch.device(device)
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        fmt = spec.format
        scheme = fmt.scheme()
        groups = fmt.scales_per_head(spec.head_dim)
        # Zero-filled: padded key positions are masked out, but 0 * NaN would still poison the output
        # (FP8 zero bytes are 0.0; zero scales dequantize them to 0.0 too).
        self.layers = [LayerKV(torch.zeros(shape, dtype=spec.torch_dtype, device=self.device),
                               scales=torch.zeros((*shape[:4], groups), dtype=scheme.scale_dtype, device=self.device)
                               if groups else None, scheme=scheme)
                       for _ in range(spec.num_layers)]
        if fmt.static:  # calibrated per layer (engine: load_static_scales); NaN until then, so a miss shows
            for layer in self.layers:
                layer.static_scales = torch.full((2, spec.num_kv_heads), float("nan"), device=self.device)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for every layer's KV (data, scales and block metadata)."""
        return sum(layer.nbytes for layer in self.layers)

    def add_block_meta(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                       layers: Sequence[int] | None = None) -> None:
        """Give every layer (or only `layers`) a zeroed per-block metadata tensor [num_ids, *shape] under `name` (a
        row for every block id, spill ids included: a selector scores a spilled block without loading it)."""
        for i in range(len(self.layers)) if layers is None else layers:
            self.layers[i].block_meta[name] = torch.zeros((self.num_ids, *shape), dtype=dtype, device=self.device)

    def part_layout(self) -> dict[str, tuple[torch.Tensor, int, list[int]]]:
        """name -> (one layer's tensor, its block dim, the layers that hold the part), in a fixed order: data,
        scales, then block metadata (which a component may give to some layers only, e.g. Engram's values)."""
        out: dict[str, tuple[torch.Tensor, int, list[int]]] = {}
        for i, layer in enumerate(self.layers):
            for name, (t, dim) in layer.parts().items():
                if name in out:
                    out[name][2].append(i)
                else:
                    out[name] = (t, dim, [i])
        return out

    # ---- batched block verbs -------------------------------------------------------------------
    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise IndexError(f"block ids out of range [0, {self.num_blocks}): {list(block_ids)[:8]}")
        return ids.to(self.device)

    def gather_blocks(self, block_ids: Sequence[int], device: torch.device | str | None = None,
                      pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Every layer's state of the given blocks, block-major: {part: [n, num_layers, *per-block shape]}.

        One index_select per layer and part, then one copy to `device` (default: the storage's own);
        `pin_memory` pins a host buffer so a later copy back to a GPU can run asynchronously."""
        idx = self._index(block_ids)
        out: dict[str, torch.Tensor] = {}
        for name, (first, _, holders) in self.part_layout().items():
            per_layer = []
            for layer in (self.layers[i] for i in holders):
                t, dim = layer.parts()[name]
                sel = _raw(t).index_select(dim, idx)
                per_layer.append(sel.movedim(dim, 0) if dim else sel)  # [n, *rest]
            stacked = torch.stack(per_layer, dim=1)  # [n, L, *rest]
            target = torch.device(device) if device is not None else self.device
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
            if target != stacked.device or pin_memory:
                buf = torch.empty(stacked.shape, dtype=stacked.dtype, device=target,
                                  pin_memory=pin_memory and target.type == "cpu" and torch.cuda.is_available())
                buf.copy_(stacked)
                stacked = buf
            out[name] = stacked.contiguous().view(first.dtype)
        return out

    def scatter_blocks(self, block_ids: Sequence[int], parts: dict[str, torch.Tensor],
                       non_blocking: bool = False) -> None:
        """Write block-major parts (as `gather_blocks` returns them, from any device) into the given blocks.
        `non_blocking`: copy pinned host parts asynchronously on the current stream (the caller orders
        readers after it, e.g. with an event; torch's pinned allocator keeps the buffer until the copy ran)."""
        idx = self._index(block_ids)
        layout = self.part_layout()
        if set(parts) != set(layout):
            raise ValueError(f"parts {sorted(parts)} do not match this storage's {sorted(layout)}")
        for name, src in parts.items():
            holders = layout[name][2]
            if src.shape[0] != len(idx) or src.shape[1] != len(holders):
                raise ValueError(f"part {name!r} has shape {tuple(src.shape)}: expected [{len(idx)}, "
                                 f"{len(holders)}, ...]")
            src = _raw(src.to(self.device, non_blocking=non_blocking))  # blocking by default: the caller may reuse its buffer
            for i, layer in enumerate(self.layers[j] for j in holders):
                t, dim = layer.parts()[name]
                piece = src[:, i]  # [n, *rest]
                _raw(t).index_copy_(dim, idx, piece.movedim(0, dim) if dim else piece)

    def copy_blocks(self, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
        """Copy blocks src_ids[i] -> dst_ids[i] in every layer, on the device."""
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destinations")
        src, dst = self._index(src_ids), self._index(dst_ids)
        for layer in self.layers:
            for t, dim in layer.parts().values():
                raw = _raw(t)
                raw.index_copy_(dim, dst, raw.index_select(dim, src))
