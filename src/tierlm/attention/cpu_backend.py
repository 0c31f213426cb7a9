"""CpuBackend ("cpu"): fp32 compute on the CPU over fp32 or FP8 KV, the default there when the native
kernels are built.

  decodes   tierlm.kernels.cpu.paged_decode (fp32 KV) / paged_decode_fp8 (FP8 KV, its bytes widened in
            registers with their scales, so a step reads about a quarter of the fp32 bytes): a C kernel
            walks each sequence's block table and reads its K/V rows in place (flash-decoding style
            running softmax), no gather; a shape the kernel declines (scratch too small) falls back to the
            torch backend's gather + SDPA
  prefills  split in two parts that never need a mask, merged by their log-sum-exp:

                keys:  | cached context [0, ctx) ............ | this chunk's own [ctx, seq_len) |
                part:  | A: unmasked, read from the cache     | B: causal, the fresh k/v        |
                out  = (A * e^lseA + B * e^lseB) / (e^lseA + e^lseB)          (per query row, per head)

            A reads the context blocks in runs (one gather per run of at most RUN_TOKENS tokens, so the
            scratch stays bounded whatever the context; FP8 runs dequantized to fp32 by LayerKV.read_blocks)
            and folds each run into a running (out, lse);
            B uses the chunk's k/v as write_kv stored them this step (FP8: their dequantized values, so
            the chunk sees what a later read would), never read back from the cache.
            Both go through torch's CPU flash-attention kernel (blocked GEMMs, ~90% of this machine's
            sgemm rate), which returns the log-sum-exp; the masked single SDPA the torch backend uses
            ran at ~60% of that rate here, and the chunk's mask cost memory traffic besides.

GQA: part A lays the G query heads of a KV head out as G * q_len rows against that head's keys (no
repeat); part B, causal, repeats the chunk's K/V G times (q_len rows only) so each query head is causal.
"""
from __future__ import annotations

import functools

from typing import TYPE_CHECKING

import torch

from tierlm.attention.backend import AttentionBackend, register_backend
from tierlm.attention.metadata import AttentionMetadata, kv_index
from tierlm.attention.torch_backend import TorchPagedBackend
from tierlm.core.registry import get_kv_format
from tierlm.kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from tierlm.kvcache.storage import LayerKV

RUN_TOKENS = 4096  # context tokens gathered per run of part A


def _flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Q, D], k/v [B, H, L, D] -> (out [B, H, Q, D] in q's dtype, lse [B, H, Q] fp32), on the CPU."""
    return _flash_op()(q, k, v, is_causal=causal, scale=scale)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets: [..., Q, D] with lse [..., Q]."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


class CpuBackend(TorchPagedBackend):
    name = "cpu"
    summary = "CPU fp32: native in-place decode kernel, mask-free prefill merged by log-sum-exp"
    reads_spill_in_place = True  # the decode kernels read spill ids from the (host) spill store directly

    @classmethod
    def unsupported(cls, device, dtype, kv_format):
        if device.type != "cpu":
            return "it runs on the CPU only"
        if dtype != torch.float32 or not (kv_format == "fp32" or get_kv_format(kv_format).scaled):
            return "it needs fp32 compute and fp32 or FP8 KV"
        if _flash_op() is None:
            return "this torch build lacks the CPU flash-attention op"
        if not cpu_kernels.usable(torch.zeros(1)):
            return f"the native CPU kernels are not in use ({cpu_kernels.status()['reason']})"
        return None

    def prepare(self, meta: AttentionMetadata, num_blocks: int) -> None:
        meta.backend_state = None  # the kernel reads block tables as they are; see _fallback_decode

    def with_decode_tables(self, meta, tables, lens, num_blocks):
        return AttentionBackend.with_decode_tables(self, meta, tables, lens, num_blocks)  # no derived state

    def attend(self, q, k, v, layer: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        parts = []
        nd = meta.num_decodes
        if nd:
            sp = layer.spill  # spill ids in the tables are read where they are (kvcache/spill.py), in place
            if layer.scheme is None:
                o = cpu_kernels.paged_decode(q[:nd], layer.data, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                             spill=None if sp is None else sp.data)
            else:
                sch = layer.scheme
                o = cpu_kernels.paged_decode_fp8(
                    q[:nd], layer.data, layer.scales if layer.scales is not None else layer.static_scales, sch.fp8,
                    sch.scale_type, meta.decode_block_tables, meta.decode_seq_lens, scale,
                    spill=None if sp is None else sp.data, spill_scales=None if sp is None else sp.scales)
            parts.append(o if o is not None else self._fallback_decode(q[:nd], layer, meta, scale))
        for row, q_len, seq_len, table in meta.prefill_rows():
            rows = slice(row, row + q_len)
            parts.append(self._prefill_split(q[rows], k[rows], v[rows], layer, table, seq_len - q_len, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _fallback_decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """A decode shape the kernel declines (its scratch would not fit): the torch backend's gather + SDPA,
        its per-step state built at the first such layer and kept for the others."""
        if meta.backend_state is None:
            meta.backend_state = self._prepare_decodes(meta, layer.num_ids)
        return self.decode(q, layer, meta, scale)

    def _prefill_split(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV,
                       table: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
        """q: [q_len, Hq, D], k/v: [q_len, Hkv, D] (this chunk's), ctx cached tokens before it -> [q_len, Hq, D]."""
        q_len, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        # Part B, causal over the chunk itself: q [1, Hq, q_len, D] against K/V repeated per query head.
        qb = q.transpose(0, 1).unsqueeze(0)
        kb = k.transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
        vb = v.transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
        out, lse = attention_with_lse(qb.contiguous(), kb, vb, scale, causal=True)  # [1, Hq, q_len, D], [1, Hq, q_len]
        if ctx:
            # Part A, unmasked over the cached context: q rows [1, Hkv, G * q_len, D] (head h = kv * G + g).
            qa = q.view(q_len, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * q_len, d)
            nb, bs = layer.num_ids, layer.data.shape[2]
            run_blocks = max(1, RUN_TOKENS // bs)
            # FP8: the native kernel widens the bytes (~9x torch's float8 -> float32 here); same values
            widen = None if layer.scheme is None else functools.partial(cpu_kernels.widen_fp8_rows, fp8=layer.scheme.fp8)
            for start in range(0, ctx, run_blocks * bs):
                end = min(ctx, start + run_blocks * bs)
                ids = table[start // bs: (end + bs - 1) // bs]
                # kv: [2 * n, bs, Hkv, D] (FP8 dequantized) -> [2, Hkv, end - start, D], contiguous for flash
                kv = layer.read_blocks(kv_index(ids, nb), widen).view(2, -1, hkv, d)[:, : end - start]
                kv = kv.transpose(1, 2).contiguous()
                oa, la = attention_with_lse(qa, kv[0:1], kv[1:2], scale)  # [1, Hkv, G * q_len, D]
                out, lse = merge_lse(out, lse, oa.reshape(1, hq, q_len, d), la.reshape(1, hq, q_len))
        return out[0].transpose(0, 1)  # [q_len, Hq, D]


register_backend(CpuBackend, preferred=True)
