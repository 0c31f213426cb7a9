"""Engram's gated memory layer (REFERENCE.md section 4): the rows a token's N-grams address (tierlm.memory) become
one memory vector e_t, and the layer adds alpha_t * v_t to the residual stream, where

    k = W_K e,  v = W_V e,  alpha = sigmoid(signed_sqrt(RMSNorm(h) . RMSNorm(k) / sqrt(d)))

(signed_sqrt(x) = sign(x) sqrt(|x|)), so a token whose memory does not fit its context is gated out. An optional
causal depthwise convolution over the gated values (kernel 4, dilation 3, zero-initialized, so a new layer starts
as the plain gated value) mixes a short window of earlier positions; for decoding, `forward` takes and returns the
last (kernel - 1) * dilation values of each sequence (`state`), and stepping token by token with it equals the
whole-sequence pass (tested).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.models.layers import RMSNorm


def signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.sqrt(x.abs())


class EngramLayer(nn.Module):
    def __init__(self, hidden: int, slots: int, row_dim: int, eps: float = 1e-5, conv_kernel: int = 4,
                 conv_dilation: int = 3, use_conv: bool = True):
        super().__init__()
        self.hidden, self.mem = hidden, slots * row_dim
        self.w_k = nn.Linear(self.mem, hidden, bias=False)
        self.w_v = nn.Linear(self.mem, hidden, bias=False)
        self.norm_h, self.norm_k = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.kernel, self.dilation = conv_kernel, conv_dilation
        self.conv = nn.Parameter(torch.zeros(hidden, conv_kernel)) if use_conv else None  # zero init: starts off

    @property
    def state_len(self) -> int:
        """Earlier gated values a causal conv step needs (0 without the conv)."""
        return 0 if self.conv is None else (self.kernel - 1) * self.dilation

    def gate(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        score = (self.norm_h(h) * self.norm_k(k)).sum(-1, keepdim=True) / math.sqrt(self.hidden)
        return torch.sigmoid(signed_sqrt(score))

    def branch(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The gated value before the conv: h [..., hidden], e [..., slots * row_dim] -> [..., hidden]."""
        e = e.to(h.dtype)
        return self.gate(h, self.w_k(e)) * self.w_v(e)

    def conv_mix(self, out: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        """The conv applied one position at a time: out [N, hidden] (the gated values), earlier [N, kernel - 1,
        hidden] (the gated values dilation, 2 dilation, ... positions back; zeros before a sequence's start) ->
        out + conv, what `forward` gives at those positions. The engine keeps the earlier values paged with the
        KV (models/v4mini.py)."""
        w = self.conv.to(out.dtype)  # [hidden, kernel]: w[:, kernel - 1] weighs the current position
        mixed = out * w[:, -1]
        for j in range(1, self.kernel):
            mixed = mixed + earlier[:, j - 1] * w[:, self.kernel - 1 - j]
        return out + mixed

    def forward(self, h: torch.Tensor, e: torch.Tensor, state: torch.Tensor | None = None):
        """h [B, T, hidden] (the residual stream), e [B, T, slots, row_dim] (the gathered rows) -> (the branch
        output [B, T, hidden] to add to the residual, the new conv state [B, state_len, hidden] or None)."""
        out = self.branch(h, e.flatten(-2))
        if self.conv is None:
            return out, None
        B, T, H = out.shape
        if state is None:
            state = out.new_zeros(B, self.state_len, H)
        seq = torch.cat((state, out), dim=1)  # [B, state_len + T, H]
        conv = F.conv1d(seq.transpose(1, 2), self.conv.unsqueeze(1).to(seq.dtype), dilation=self.dilation,
                        groups=H)  # valid conv: output t sees seq[t .. t + state_len], i.e. positions <= t
        return out + conv.transpose(1, 2), seq[:, seq.shape[1] - self.state_len:]
