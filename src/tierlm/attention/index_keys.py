"""FP8 index keys: pick a decode step's blocks by a scan of small FP8 copies of the keys (DeepSeek V3.2's
split, applied to any model without training), so attention can read a lossless KV that lives spilled below
the pool only where it matters.

Every layer keeps, per block and token, the key as written, rounded to FP8 e4m3 with one fp32 scale per KV head
(amax / 448): block metadata "index_k" [num_ids, Hkv, D, block_size] (bytes, token-minor: one channel of a
block's tokens is contiguous, which the native scan reads 16 tokens per load) and "index_s" [num_ids, Hkv,
block_size], 204 bytes per token and layer for the default model (Quest's fp32 bounds: 96), on the device and
moving with the block through the prefix cache, the tiers and spilling like any block metadata.

For a decode row the selector scores candidate block j by its largest share of any query head's softmax mass:

    lse_h(j) = log sum_{t in j} exp(scale * q_h . k~_t)      (k~: the FP8 index key, dequantized)
    Z_h      = logsumexp_j lse_h(j)  over the blocks scanned (sink, window, candidates)
    s(j)     = max_h (lse_h(j) - Z_h)

and keeps the best within the budget, with Quest's sink / window / dense-layer rules and the same compacted
tables. On the default model at 4K and a 1,024-token budget this scores top-1 0.990 (KL 0.0135) against dense
fp32 with fp32 attention (scripts/index_key_quality.py on branch sparse-select), where Quest's bounds score
0.68. On the CPU the scan is one native call (kernels.cpu.index_select); the torch path here is its definition.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tierlm.attention.sparse import Picks, QuestSelector
from tierlm.kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from tierlm.kvcache.storage import KVStorage, LayerKV

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def add_index_keys(storage: KVStorage) -> None:
    """Index keys (e4m3 bytes) and their per-token, per-head fp32 scales in every layer's block metadata."""
    bs, hkv, d = storage.spec.block_size, storage.spec.num_kv_heads, storage.spec.head_dim
    storage.add_block_meta("index_k", (hkv, d, bs), torch.uint8)
    storage.add_block_meta("index_s", (hkv, bs), torch.float32)


def quantize_index_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k [T, Hkv, D] -> (e4m3 bytes [T, Hkv, D], fp32 scales [T, Hkv]); a zero row gets scale 1."""
    amax = k.float().abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (k.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(torch.uint8), scale


def write_index_keys(layer: LayerKV, slots: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """Store the index keys of the tokens just written (k [T, Hkv, D], at cache slots [T])."""
    data, scales = quantize_index_keys(k)
    ik, isc = layer.block_meta["index_k"], layer.block_meta["index_s"]
    blocks, offs = torch.div(slots, block_size, rounding_mode="floor"), slots % block_size
    ik.permute(0, 3, 1, 2)[blocks, offs] = data  # [T, Hkv, D] into [block, Hkv, D, offset]
    isc.permute(0, 2, 1)[blocks, offs] = scales


def index_keys(layer: LayerKV, ids: torch.Tensor) -> torch.Tensor:
    """The dequantized index keys of blocks `ids` [...] -> [..., block_size, Hkv, D] fp32."""
    ik, isc = layer.block_meta["index_k"], layer.block_meta["index_s"]
    flat = ids.reshape(-1)
    k = ik.index_select(0, flat).view(FP8).float() * isc.index_select(0, flat)[:, :, None, :]  # [n, Hkv, D, bs]
    hkv, d, bs = ik.shape[1:]
    return k.permute(0, 3, 1, 2).reshape(*ids.shape, bs, hkv, d)


class IndexKeySelector(QuestSelector):
    """Quest's rules (sink, window, budget, dense layers, compacted tables), blocks ranked by the index-key scan
    (see the module docstring). `on_write` keeps the index keys instead of Quest's bounds."""

    name = "index"

    def add_meta(self, storage: KVStorage) -> None:
        add_index_keys(storage)

    def on_write(self, layer: LayerKV, slots: torch.Tensor, k: torch.Tensor, block_size: int,
                 sync_free: bool | None = None) -> None:
        write_index_keys(layer, slots, k, block_size)  # sync-free on every device

    def _select_native(self, q: torch.Tensor, layer: LayerKV, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                       width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One call of kernels.cpu.index_select (the index keys read in place through the tables; ties to the
        lower position)."""
        return cpu_kernels.index_select(q, layer.block_meta["index_k"], layer.block_meta["index_s"], tables, lens,
                                        self.block_size, self.sink_blocks, self.window_blocks, self.budget_blocks,
                                        scale, width)

    def _select_torch(self, q: torch.Tensor, layer: LayerKV, tables: torch.Tensor, lens: torch.Tensor,
                      scale: float, static: bool = False) -> Picks:
        """`select` in torch ops (any device; the definition the native kernel matches)."""
        bs = self.block_size
        n, mb = tables.shape

        def share(valid: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
            """max_h (lse_h(j) - Z_h) over the dequantized index keys [N, MB]."""
            k = index_keys(layer, tables)  # [N, MB, bs, Hkv, D]
            hkv, hq, d = k.shape[3], q.shape[1], q.shape[2]
            qg = q.float().view(n, hkv, hq // hkv, d)
            logits = torch.einsum("nmthd,nhgd->nmthg", k, qg).reshape(n, mb, bs, hq) * scale
            tok = torch.arange(mb * bs, device=tables.device).view(mb, bs)  # token positions
            logits = logits.masked_fill((tok[None] >= lens[:, None, None])[..., None], float("-inf"))
            lse = logits.logsumexp(2).masked_fill(~valid[:, :, None], float("-inf"))  # [N, MB, Hq]
            return (lse - lse.logsumexp(1, keepdim=True)).amax(-1)

        return self.pick(tables, lens, share, static)
