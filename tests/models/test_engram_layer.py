"""The Engram layer (models/engram.py): the gate's form, causality, zero-initialized conv, and stepping with the
conv state equal to the whole-sequence pass; gradients reach the memory rows (what training needs)."""
from __future__ import annotations

import math

import torch

from tierlm.models.engram import EngramLayer, signed_sqrt


def _layer(seed=0, conv=True):
    torch.manual_seed(seed)
    layer = EngramLayer(hidden=32, slots=4, row_dim=8, use_conv=conv)
    if conv:
        with torch.no_grad():
            layer.conv.normal_()
    return layer


def test_the_gate_is_the_papers_formula():
    layer = _layer(conv=False)
    h, e = torch.randn(2, 5, 32), torch.randn(2, 5, 4, 8)
    out, state = layer(h, e)
    k, v = layer.w_k(e.flatten(-2)), layer.w_v(e.flatten(-2))
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # noqa: E731 (norm weights are 1)
    alpha = torch.sigmoid(signed_sqrt((rms(h) * rms(k)).sum(-1, keepdim=True) / math.sqrt(32)))
    torch.testing.assert_close(out, alpha * v)
    assert state is None and ((alpha > 0) & (alpha < 1)).all()


def test_a_new_layers_conv_adds_nothing():
    torch.manual_seed(1)
    layer = EngramLayer(hidden=32, slots=4, row_dim=8)
    h, e = torch.randn(1, 6, 32), torch.randn(1, 6, 4, 8)
    out, _ = layer(h, e)
    torch.testing.assert_close(out, layer.gate(h, layer.w_k(e.flatten(-2))) * layer.w_v(e.flatten(-2)))


def test_causal_and_stepwise_equals_whole_sequence():
    layer = _layer(seed=2)
    h, e = torch.randn(2, 20, 32), torch.randn(2, 20, 4, 8)
    full, _ = layer(h, e)
    h2 = h.clone()
    h2[:, 12:] += 1.0  # later positions change: earlier outputs must not
    changed, _ = layer(h2, e)
    assert torch.equal(changed[:, :12], full[:, :12]) and not torch.allclose(changed[:, 12:], full[:, 12:])
    out, state = layer(h[:, :7], e[:, :7])  # a prefill, then token-by-token decode with the state
    steps = [out]
    for t in range(7, 20):
        o, state = layer(h[:, t:t + 1], e[:, t:t + 1], state)
        steps.append(o)
    assert state.shape == (2, layer.state_len, 32)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_gradients_reach_the_memory_rows():
    layer = _layer(seed=3)
    e = torch.randn(1, 5, 4, 8, requires_grad=True)
    out, _ = layer(torch.randn(1, 5, 32), e)
    out.square().sum().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0 and layer.conv.grad.abs().sum() > 0
    # W_K acts only through the gate's RMSNorm: the norm must keep the graph (the native CPU kernel has no backward)
    assert layer.w_k.weight.grad is not None and layer.w_k.weight.grad.abs().sum() > 0
