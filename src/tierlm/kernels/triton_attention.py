"""Paged decode attention in Triton: each decode row's K/V blocks read in place through its block table, for
unscaled (fp32, bf16, fp16) and FP8 KV (per-token fp32 or UE8M0 scales in groups, or static per-head scales),
with split-KV ("flash-decoding") so a few long sequences still fill the GPU.

    grid (Nd, Hkv, S)   program (n, h, s): the G = Hq / Hkv query heads of KV head h of decode row n, over
                        blocks [s * bps, (s + 1) * bps) of row n's table (bps = blocks per split)
    per block           load K, V [bs, D] (FP8: widened and scaled in registers), scores [G, bs] = q . k,
                        running max / sum / output (online softmax), masked past the row's length
    S == 1              the program writes the normalized output directly
    S > 1               it writes its partial output and log-sum-exp; a second kernel (grid Nd, Hq) merges
                        the S parts:  out = sum_s e^(lse_s - m) o_s / sum_s e^(lse_s - m)

The block table and lengths are read on the device, and the grid depends only on shapes (Nd, Hkv, the table
width), never on lengths, so a captured decode step (engine/cuda_graph.py) replays it unchanged. A sparse
selector's compacted tables (attention/sparse.py) go through the same kernel: it reads whatever blocks a
row's table names.

Triton is optional (the backend checks for it before importing this module). On a machine without a GPU the
kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported), which the tests
use on small shapes against the torch backend (the reference).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch backend runs everywhere
    triton = None

SCALES_NONE, SCALES_FP32, SCALES_UE8M0, SCALES_STATIC = 0, 1, 2, 3


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit(do_not_specialize=["sm_scale", "blocks_per_split"])  # values that change step by step: no recompiles
    def _decode_kernel(q_ptr, kv_ptr, sc_ptr, tab_ptr, len_ptr, out_ptr, part_ptr, lse_ptr,
                       sm_scale, blocks_per_split,
                       s_qn, s_qh, s_kv, s_kb, s_kt, s_kh, s_sv, s_sb, s_st, s_sh, s_tn,
                       s_on, s_oh, s_pn, s_ph, s_ps, s_ln, s_lh,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       BS: tl.constexpr, BSP: tl.constexpr, SCALES: tl.constexpr, GROUP: tl.constexpr,
                       SPLIT: tl.constexpr):
        n = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        seq_len = tl.load(len_ptr + n).to(tl.int32)  # int32 block arithmetic (and loop bounds of one type)
        nblocks = (seq_len + BS - 1) // BS
        b_start = s * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, nblocks)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        t = tl.arange(0, BSP)
        gm = g < G
        dm = d < D
        heads = kvh * G + g
        q = tl.load(q_ptr + n * s_qn + heads[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32) * sm_scale  # [GP, DP], the logit scale folded in
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        if SCALES == 3:  # static: [2, Hkv] fp32, one per K/V and head
            k_static = tl.load(sc_ptr + kvh * s_sh)
            v_static = tl.load(sc_ptr + s_sv + kvh * s_sh)
        for b in range(b_start, b_end):
            blk = tl.load(tab_ptr + n * s_tn + b).to(tl.int64)
            valid = (t < BS) & (b * BS + t < seq_len)
            lm = valid[:, None] & dm[None, :]
            off = blk * s_kb + t[:, None] * s_kt + kvh * s_kh + d[None, :]
            k = tl.load(kv_ptr + off, mask=lm, other=0.0).to(tl.float32)  # [BSP, DP]
            v = tl.load(kv_ptr + s_kv + off, mask=lm, other=0.0).to(tl.float32)
            if SCALES == 1 or SCALES == 2:  # per token: [2, NB, BS, Hkv, D / GROUP]
                soff = blk * s_sb + t[:, None] * s_st + kvh * s_sh + (d // GROUP)[None, :]
                ks = tl.load(sc_ptr + soff, mask=lm, other=0)
                vs = tl.load(sc_ptr + s_sv + soff, mask=lm, other=0)
                if SCALES == 2:  # UE8M0: the byte is the fp32 exponent field
                    ks = (ks.to(tl.int32) << 23).to(tl.float32, bitcast=True)
                    vs = (vs.to(tl.int32) << 23).to(tl.float32, bitcast=True)
                k = k * ks
                v = v * vs
            if SCALES == 3:
                k = k * k_static
                v = v * v_static
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BSP]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        om = gm[:, None] & dm[None, :]
        if SPLIT:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))  # -inf: an empty split
            tl.store(part_ptr + n * s_pn + heads[:, None] * s_ph + s * s_ps + d[None, :], acc / l_safe[:, None],
                     mask=om)
            tl.store(lse_ptr + n * s_ln + heads * s_lh + s, lse, mask=gm)
        else:
            o = acc / l_i[:, None]
            tl.store(out_ptr + n * s_on + heads[:, None] * s_oh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit(do_not_specialize=["num_splits"])
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_splits, s_pn, s_ph, s_ps, s_ln, s_lh, s_on, s_oh,
                      D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr):
        n = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, DP)
        sm = s < num_splits
        lse = tl.load(lse_ptr + n * s_ln + h * s_lh + s, mask=sm, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, axis=0))  # [SP]; 0 for empty splits and padding
        part = tl.load(part_ptr + n * s_pn + h * s_ph + s[:, None] * s_ps + d[None, :],
                       mask=sm[:, None] & (d < D)[None, :], other=0.0)
        o = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + n * s_on + h * s_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def num_splits(num_rows: int, num_kv_heads: int, table_width: int, target_programs: int,
               min_blocks: int = 1) -> int:
    """Splits per row so that about `target_programs` programs run (each split >= `min_blocks` blocks). A
    function of shapes only: a captured step keeps it."""
    want = max(1, -(-target_programs // max(1, num_rows * num_kv_heads)))
    return max(1, min(want, table_width // max(1, min_blocks)))


def paged_decode(q: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None, scale_kind: int, group: int,
                 tables: torch.Tensor, lens: torch.Tensor, sm_scale: float, splits: int = 1) -> torch.Tensor:
    """q [Nd, Hq, D]; data [2, NB, bs, Hkv, D] (one layer's paged K/V, any float dtype, FP8 included);
    scales: per-token [2, NB, bs, Hkv, D / group] (fp32, or uint8 UE8M0) or static [2, Hkv] fp32, per
    `scale_kind` (SCALES_*), else None; tables [Nd, MB] and lens [Nd] (int64, on the device) ->
    out [Nd, Hq, D] in q's dtype. Rows attend over their first lens[n] tokens through their tables."""
    nd, hq, d = q.shape
    _, _, bs, hkv, dd = data.shape
    if dd != d or hq % hkv:
        raise ValueError(f"q [{nd}, {hq}, {d}] does not fit KV with {hkv} heads of {dd}")
    if data.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_decode needs the head dim contiguous in q and the KV")
    g = hq // hkv
    mb = tables.shape[1]
    splits = max(1, min(splits, mb))
    bps = -(-mb // splits)
    splits = -(-mb // bps)
    out = torch.empty((nd, hq, d), dtype=q.dtype, device=q.device)
    if nd == 0:
        return out
    sc = scales if scales is not None else lens  # any tensor: the kernel never reads it without scales
    if scale_kind == SCALES_STATIC:
        sst = (sc.stride(0), 0, 0, sc.stride(1))
    elif scale_kind in (SCALES_FP32, SCALES_UE8M0):
        sst = (sc.stride(0), sc.stride(1), sc.stride(2), sc.stride(3))
    else:
        sst = (0, 0, 0, 0)
    split = splits > 1
    if split:
        part = torch.empty((nd, hq, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((nd, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part, lse = out, lens  # unused
    pst = (part.stride(0), part.stride(1), part.stride(2)) if split else (0, 0, 0)
    lst = (lse.stride(0), lse.stride(1)) if split else (0, 0)
    _decode_kernel[(nd, hkv, splits)](
        q, data, sc, tables, lens, out, part, lse, float(sm_scale), bps,
        q.stride(0), q.stride(1), data.stride(0), data.stride(1), data.stride(2), data.stride(3), *sst,
        tables.stride(0), out.stride(0), out.stride(1), *pst, *lst,
        G=g, GP=_pow2(g), D=d, DP=_pow2(d), BS=bs, BSP=_pow2(bs), SCALES=scale_kind, GROUP=group, SPLIT=split)
    if split:
        _merge_kernel[(nd, hq)](part, lse, out, splits, *pst, *lst, out.stride(0), out.stride(1),
                                D=d, DP=_pow2(d), SP=_pow2(splits))
    return out
