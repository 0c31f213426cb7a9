"""The lightning indexer (DeepSeek V3.2 sparse attention, DSA): a small FP8 scorer that picks, per query token, the
context tokens the main attention then reads. It needs trained weights; models without them use `quest`.

For a query token t (at absolute position p_t) and a context token s, with H_I indexer heads of D_I dims:

    I(t, s) = sum_j w(t, j) * ReLU(q(t, j) . k(s))        j = 0 .. H_I - 1, visible only when s <= p_t

q(t, j) [D_I] is head j's indexer query, k(s) [D_I] the one key shared by all heads, w(t, j) a per-token head
weight (signed; a projection of the hidden state). The top-k tokens by I(t, .) are attended to; DeepSeek V3.2
uses H_I = 64 heads x D_I = 128 dims and k = 2048 tokens. Shapes here:

    q [T, H_I, D_I] (fp32 / bf16), w [T, H_I], positions [T] (absolute, int64)
    key cache: data [N, D_I] FP8 e4m3 bytes (uint8) + scales [N] fp32, one per token (quantized on write)
    scores [T, S] fp32 (-inf where s > p_t), picks [T, min(k, S)] int64 positions, in position order, -1 padded

As in DeepSeek, queries are quantized to FP8 e4m3 too (one scale per token and head) before the score; here
both sides are dequantized (tierlm.quant) and the score is one matmul [T * H_I, D_I] @ [D_I, S] per chunk of
queries, then ReLU and a [1, H_I] @ [H_I, S] head reduction per query. The key cache is for one sequence:
context position s lives in cache row s, or, for a paged cache, in row `rows[s]` (see `block_rows`).
Equal scores are broken toward the earlier position, so the picks are deterministic.

What the model does before calling this: RoPE on the rope part of q and k, and (DeepSeek) a Hadamard rotation
of q and k, which keeps dot products and spreads outliers before FP8; `IndexerWeights.project` does the rest.

A model that has an indexer exposes `indexer_weights(layer_idx) -> IndexerWeights | None` (None: that layer
has no indexer, e.g. a dense layer); `require_indexer` checks it when the `indexer` selector is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.core.errors import InvalidParameterError
from tierlm.quant.fp8 import Fp8Scheme, dequantize, quantize

INDEXER_FP8 = Fp8Scheme("e4m3")  # one fp32 scale per row (token for keys, token x head for queries)
DEEPSEEK_V32 = {"heads": 64, "head_dim": 128, "topk": 2048}
_CHUNK_ELEMS = 1 << 24  # bound on the [T_chunk, H_I, S] fp32 logits held at once (64 MiB)


@dataclass
class IndexerWeights:
    """One layer's indexer projections (torch Linear layout, [out, in]).

    wq [H_I * D_I, q_in]   query projection, from the query's low-rank latent (DeepSeek) or the hidden state
    wk [D_I, hidden]       key projection (one key head, shared by every indexer head)
    ww [H_I, hidden]       head-weight projection: w(t, j)
    k_norm, k_norm_bias [D_I] or None: LayerNorm on the key (DeepSeek V3.2 has one), none when both are None
    """

    wq: torch.Tensor
    wk: torch.Tensor
    ww: torch.Tensor
    k_norm: torch.Tensor | None = None
    k_norm_bias: torch.Tensor | None = None
    eps: float = 1e-6

    @property
    def num_heads(self) -> int:
        return self.ww.shape[0]

    @property
    def head_dim(self) -> int:
        return self.wk.shape[0]

    @classmethod
    def random(cls, hidden: int, heads: int, head_dim: int, generator: torch.Generator | None = None,
               q_in: int | None = None) -> IndexerWeights:
        """Random weights (fan-in scaled normal, LayerNorm at identity) for tests."""
        q_in = q_in or hidden

        def rnd(*shape):
            return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

        return cls(rnd(heads * head_dim, q_in), rnd(head_dim, hidden), rnd(heads, hidden),
                   torch.ones(head_dim), torch.zeros(head_dim))

    def project(self, x: torch.Tensor, q_in: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] (and q_in [T, q_in], default x) -> q [T, H_I, D_I], k [T, D_I], w [T, H_I], fp32, before
        RoPE. w carries DeepSeek's constant (H_I * D_I) ** -0.5 (head average and softmax scale)."""
        x = x.float()
        q = F.linear(x if q_in is None else q_in.float(), self.wq.float()).view(-1, self.num_heads, self.head_dim)
        k = F.linear(x, self.wk.float())
        if self.k_norm is not None or self.k_norm_bias is not None:
            k = F.layer_norm(k, (self.head_dim,), self.k_norm, self.k_norm_bias, self.eps)
        w = F.linear(x, self.ww.float()) * (self.num_heads * self.head_dim) ** -0.5
        return q, k, w


# ---- the FP8 key cache --------------------------------------------------------------------------------
@dataclass
class IndexerKeyCache:
    """data [N, D_I] uint8 (FP8 e4m3 bytes), scales [N] fp32: key of row r = fp8(data[r]) * scales[r]."""

    data: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def empty(cls, num_rows: int, head_dim: int, device: torch.device | str = "cpu") -> IndexerKeyCache:
        return cls(torch.zeros(num_rows, head_dim, dtype=torch.uint8, device=device),
                   torch.ones(num_rows, dtype=torch.float32, device=device))

    def keys(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The stored keys of `rows` (default: all) dequantized -> fp32 [len(rows), D_I]."""
        data, scales = (self.data, self.scales) if rows is None else (self.data[rows], self.scales[rows])
        return dequantize(data.unsqueeze(1), scales.view(-1, 1, 1), INDEXER_FP8).squeeze(1)


def write_indexer_keys(cache: IndexerKeyCache, k: torch.Tensor, rows: torch.Tensor) -> None:
    """Quantize keys k [T, D_I] (one scale per token) into cache rows [T], in place. Each token's bytes depend
    on that token alone, so a cache written token by token equals one written at once."""
    data, scales = quantize(k.float().unsqueeze(1), INDEXER_FP8)  # [T, 1, D], [T, 1, 1]
    cache.data.index_copy_(0, rows, data.view(torch.uint8).squeeze(1))
    cache.scales.index_copy_(0, rows, scales.view(-1))


def block_rows(block_table: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """A sequence's block table [MB] -> the cache row of each of its positions 0..num_tokens-1 [num_tokens]."""
    pos = torch.arange(num_tokens, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


# ---- scores and picks -----------------------------------------------------------------------------------
def fp8_queries(q: torch.Tensor) -> torch.Tensor:
    """q [T, H_I, D_I] -> fp32 values after an FP8 e4m3 round trip (one scale per token and head): the queries
    the score uses."""
    data, scales = quantize(q.float(), INDEXER_FP8)
    return dequantize(data, scales, INDEXER_FP8)


def index_scores(q: torch.Tensor, w: torch.Tensor, cache: IndexerKeyCache, positions: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """I(t, s) for queries q [T, H_I, D_I] with head weights w [T, H_I] at positions [T] over the context
    positions s = 0 .. S-1 held in cache rows `rows` [S] (default: rows 0 .. max(positions)) -> [T, S] fp32,
    -inf where s > p_t."""
    t, h, d = q.shape
    if t == 0:
        return q.new_zeros((0, 0 if rows is None else rows.numel()), dtype=torch.float32)
    if rows is None:
        rows = torch.arange(int(positions.max()) + 1, device=cache.data.device)
    s = rows.numel()
    if int(positions.max()) >= s:
        raise ValueError(f"a query at position {int(positions.max())} needs its own key: the context holds {s}")
    k = cache.keys(rows)  # [S, D]
    qf, wf = fp8_queries(q), w.float()
    out = torch.empty(t, s, dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, h * s))
    for a in range(0, t, step):
        b = min(t, a + step)
        logits = (qf[a:b].reshape(-1, d) @ k.T).view(b - a, h, s).relu_()  # [Tc, H, S]
        out[a:b] = torch.bmm(wf[a:b].unsqueeze(1), logits).squeeze(1)
    future = torch.arange(s, device=q.device)[None, :] > positions.to(q.device)[:, None]
    return out.masked_fill_(future, float("-inf"))


def index_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [T, S] (-inf: not visible) -> the positions of each row's k best visible tokens [T, min(k, S)],
    in position order, -1 padded (a row with <= k visible tokens gets all of them). Ties go to the earlier
    position."""
    if k < 1:
        raise InvalidParameterError(f"indexer top-k of {k} tokens", "use k >= 1 (DeepSeek V3.2 uses 2048)")
    t, s = scores.shape
    kk = min(k, s)
    out = torch.full((t, kk + 1), -1, dtype=torch.long, device=scores.device)
    if t == 0 or kk == 0:
        return out[:, :kk]
    visible = scores > float("-inf")
    thr = scores.topk(kk, dim=1).values[:, -1:]  # each row's k-th best score
    above = scores > thr
    tie = visible & (scores == thr)
    need = kk - above.sum(1, keepdim=True)  # ties to take, earliest first
    chosen = above | (tie & (tie.cumsum(1) <= need))
    slot = torch.where(chosen, chosen.cumsum(1) - 1, torch.full_like(scores, kk, dtype=torch.long))
    out.scatter_(1, slot, torch.arange(s, device=scores.device).expand(t, s))  # column kk: discarded
    return out[:, :kk]


def lightning_index(q: torch.Tensor, w: torch.Tensor, cache: IndexerKeyCache, positions: torch.Tensor, k: int,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """index_topk(index_scores(...), k): the picked positions [T, min(k, S)]."""
    return index_topk(index_scores(q, w, cache, positions, rows), k)


# ---- the formula, spelled out (the tests' reference) ------------------------------------------------------
def reference_index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                           ) -> torch.Tensor:
    """Plain loops in float64: q [T, H, D], w [T, H], k [S, D] (already as the op sees them), positions [T]."""
    t_n, h_n, _ = q.shape
    out = torch.full((t_n, k.shape[0]), float("-inf"), dtype=torch.float64)
    for t in range(t_n):
        for s in range(int(positions[t]) + 1):
            total = 0.0
            for j in range(h_n):
                total += float(w[t, j]) * max(0.0, float(torch.dot(q[t, j].double(), k[s].double())))
            out[t, s] = total
    return out


def reference_topk(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Each row's k best visible positions (ties: earlier first), sorted by position."""
    picks = []
    for row in scores.tolist():
        visible = [(-v, s) for s, v in enumerate(row) if v > float("-inf")]
        picks.append(sorted(s for _, s in sorted(visible)[:k]))
    return picks


# ---- can this model run the indexer selector? ----------------------------------------------------------
def require_indexer(model, layers=None) -> dict[int, IndexerWeights]:
    """The indexer weights of `layers` (default: range(model.config.num_layers)) that have them; raises
    InvalidParameterError naming the fix when the model exposes no `indexer_weights` or no layer has weights."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "model_id", None)
    name = name if name and name != "unknown" else type(model).__name__
    get = getattr(model, "indexer_weights", None)
    found = {}
    if callable(get):
        if layers is None:
            layers = range(getattr(cfg, "num_layers", 0) or len(getattr(model, "layers", ())))
        found = {i: wts for i in layers if (wts := get(i)) is not None}
    if not found:
        raise InvalidParameterError(
            f"sparse selector 'indexer' needs a model with trained lightning-indexer weights; {name} has none",
            "use --sparse quest (training-free, any model)", param="sparse")
    return found
