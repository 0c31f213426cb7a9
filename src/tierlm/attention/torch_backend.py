"""TorchPagedBackend ("torch"): gather + SDPA in plain PyTorch; runs on any device, dtype and KV format
(FP8 blocks are dequantized to fp32 as they are gathered: LayerKV.read_blocks), and is the reference every
other backend is tested against.

Per step (prepare): one gather index per decode batch and per prefill chunk (see metadata.kv_index), the
decode key mask (padded block tables), and each chunk's causal mask over its context.

Per layer (attend):
  decodes   gather every decode sequence's K/V blocks into [Nd, Hkv, MB * bs, D] and run one SDPA call
            with the key mask (padding masked out)
  prefills  per chunk: gather its blocks, attend with a causal mask offset by the cached context

Grouped-query attention without repeating K/V: the G = Hq / Hkv query heads that share a KV head are laid
out as G extra query rows of that head, so SDPA sees q: [B, Hkv, G * Q, D] against k: [B, Hkv, L, D].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tierlm.attention.backend import AttentionBackend, register_backend
from tierlm.attention.metadata import AttentionMetadata, kv_index

if TYPE_CHECKING:
    from tierlm.kvcache.storage import LayerKV


@dataclass
class TorchStepState:
    decode_kv_index: torch.Tensor | None = None  # [2 * Nd * MB]
    decode_key_mask: torch.Tensor | None = None  # [Nd, 1, 1, MB * bs] bool, True = attend
    prefill_kv_indices: list[torch.Tensor] = field(default_factory=list)  # each [2 * ceil(seq_len / bs)]
    prefill_masks: list[torch.Tensor] = field(default_factory=list)  # each [q_len, seq_len] bool
    _masks_by_group: dict = field(default_factory=dict)

    def prefill_mask(self, i: int, g: int) -> torch.Tensor:
        """Chunk i's mask repeated for G query rows per KV head: [G * q_len, seq_len], built once per step."""
        key = (i, g)
        if key not in self._masks_by_group:
            self._masks_by_group[key] = self.prefill_masks[i].repeat(g, 1)
        return self._masks_by_group[key]


class TorchPagedBackend(AttentionBackend):
    name = "torch"
    summary = "gather + SDPA in PyTorch (any device; the reference)"

    def prepare(self, meta: AttentionMetadata, num_blocks: int) -> None:
        st = self._prepare_decodes(meta, num_blocks)
        for _, q_len, seq_len, table in meta.prefill_rows():
            st.prefill_kv_indices.append(kv_index(table, num_blocks))
            # query i (absolute position ctx + i) sees keys 0..ctx + i
            qpos = torch.arange(seq_len - q_len, seq_len, device=table.device)
            st.prefill_masks.append(torch.arange(seq_len, device=table.device)[None, :] <= qpos[:, None])
        meta.backend_state = st

    @staticmethod
    def _prepare_decodes(meta: AttentionMetadata, num_blocks: int) -> TorchStepState:
        st = TorchStepState()
        nd, bs = meta.num_decodes, meta.block_size
        if nd:
            tables, lens = meta.decode_block_tables, meta.decode_seq_lens
            st.decode_kv_index = kv_index(tables, num_blocks)
            mb = tables.shape[1]
            st.decode_key_mask = (torch.arange(mb * bs, device=lens.device)[None, :] < lens[:, None]).view(nd, 1, 1, -1)
        return st

    def with_decode_tables(self, meta: AttentionMetadata, tables: torch.Tensor, lens: torch.Tensor,
                           num_blocks: int) -> AttentionMetadata:
        new = super().with_decode_tables(meta, tables, lens, num_blocks)
        st = self._prepare_decodes(new, num_blocks)
        old: TorchStepState = meta.backend_state
        st.prefill_kv_indices, st.prefill_masks, st._masks_by_group = (
            old.prefill_kv_indices, old.prefill_masks, old._masks_by_group)
        new.backend_state = st
        return new

    def attend(self, q, k, v, layer: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        parts = []  # each [rows, Hq, D], in row order; one part (the common case) is returned as is
        if meta.num_decodes:
            parts.append(self.decode(q[: meta.num_decodes], layer, meta, scale))
        for i, (row, q_len, seq_len, _) in enumerate(meta.prefill_rows()):
            parts.append(self._prefill(q[row:row + q_len], layer, meta, i, seq_len, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [Nd, Hq, D] -> [Nd, Hq, D] over each decode sequence's blocks."""
        st: TorchStepState = meta.backend_state
        nd, hq, d = q.shape
        hkv = layer.data.shape[3]
        # kv: [2 * Nd * MB, bs, Hkv, D] -> [2, Nd, MB * bs, Hkv, D] -> k, v: [Nd, Hkv, MB * bs, D]
        kv = layer.read_blocks(st.decode_kv_index).view(2, nd, -1, hkv, d).transpose(2, 3)
        qd = q.view(nd, hkv, hq // hkv, d).to(kv.dtype)  # [Nd, Hkv, G, D]
        o = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=st.decode_key_mask, scale=scale)
        return o.reshape(nd, hq, d).to(q.dtype)

    def _prefill(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMetadata, i: int, seq_len: int,
                 scale: float) -> torch.Tensor:
        st: TorchStepState = meta.backend_state
        q_len, hq, d = q.shape
        hkv = layer.data.shape[3]
        g = hq // hkv
        # kv: [2, L, Hkv, D] -> k, v: [1, Hkv, L, D];  qp: [q_len, Hq, D] -> [1, Hkv, G * q_len, D]
        kv = layer.read_blocks(st.prefill_kv_indices[i])
        kv = kv.view(2, -1, hkv, d)[:, :seq_len].transpose(1, 2)
        qp = q.view(q_len, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * q_len, d).to(kv.dtype)
        if seq_len == q_len and g == 1:
            o = F.scaled_dot_product_attention(qp, kv[0:1], kv[1:2], is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qp, kv[0:1], kv[1:2], attn_mask=st.prefill_mask(i, g), scale=scale)
        # o: [1, Hkv, G * q_len, D] -> [q_len, Hq, D]
        return o.view(hkv, g, q_len, d).permute(2, 0, 1, 3).reshape(q_len, hq, d).to(q.dtype)


register_backend(TorchPagedBackend)
