"""Every attention backend against dense causal attention on scrambled block tables (decodes + prefill
chunks with cached context), through the AttentionContext the models use."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierlm.attention import BACKENDS, AttentionContext, cpu_backend, select_backend
from tierlm.kvcache import KVSpec, KVStorage
from helpers.attention import dense_reference, paged_step

CPU = torch.device("cpu")


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    cls = BACKENDS[request.param]
    reason = cls.unsupported(CPU, torch.float32, "fp32")
    if reason is not None:
        pytest.skip(f"backend {request.param} cannot run here: {reason}")
    return cls()


def run_case(backend, decode_lens, prefills, hkv, g, seed, bs=4, d=8, nb=64):
    """Build a step of decodes and prefill chunks over a scrambled pool; return (backend out, reference)."""
    torch.manual_seed(seed)
    storage = KVStorage(KVSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, kv_format="fp32", block_size=bs), nb, CPU)
    cache = storage[0].data
    meta, seqs, tables, full_k, full_v, q_rows, new_k, new_v = paged_step(storage, decode_lens, prefills, g, nb)
    backend.prepare(meta, nb)
    q = torch.cat(q_rows)
    out = AttentionContext(meta, storage, backend).forward(0, q, new_k, new_v, scale=d ** -0.5)
    ref = torch.cat([dense_reference(qr, k, v, c, d ** -0.5) for qr, k, v, (c, _) in zip(q_rows, full_k, full_v, seqs)])
    # the new tokens' K/V landed in their slots
    for k, v, table, (ctx, n) in zip(full_k, full_v, tables, seqs):
        for p in range(ctx, ctx + n):
            assert torch.equal(cache[0, table[p // bs], p % bs], k[p]) and torch.equal(cache[1, table[p // bs], p % bs], v[p])
    return out, ref


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(decode_lens=st.lists(st.integers(1, 40), max_size=4),
       prefills=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 20)), max_size=3),
       hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 3]), seed=st.integers(0, 1000))
def test_matches_dense(backend, decode_lens, prefills, hkv, g, seed):
    if not decode_lens and not prefills:
        return
    out, ref = run_case(backend, decode_lens, prefills, hkv, g, seed)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_long_context_prefill_in_runs(backend, monkeypatch):
    """A context longer than one gather run of the cpu backend is folded in run by run (log-sum-exp merge)."""
    monkeypatch.setattr(cpu_backend, "RUN_TOKENS", 16)
    out, ref = run_case(backend, [5, 70], [(67, 9), (0, 13), (40, 1)], hkv=3, g=3, seed=7, nb=128)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_selection():
    assert select_backend("torch", CPU, torch.float32, "fp32").name == "torch"
    auto = select_backend("auto", CPU, torch.bfloat16, "bf16")
    assert auto.name == "torch"  # the cpu backend needs fp32
    from tierlm.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="unknown attention backend"):
        select_backend("nope", CPU, torch.float32, "fp32")
    with pytest.raises(InvalidParameterError, match="cannot run here"):
        select_backend("cpu", CPU, torch.bfloat16, "bf16")


def test_cpu_backend_falls_back_when_the_kernel_declines(monkeypatch):
    """A decode shape the native kernel declines goes through the torch backend's gather + SDPA."""
    if BACKENDS["cpu"].unsupported(CPU, torch.float32, "fp32") is not None:
        pytest.skip("the cpu backend cannot run here")
    monkeypatch.setattr(cpu_backend.cpu_kernels, "paged_decode", lambda *a, **k: None)
    out, ref = run_case(BACKENDS["cpu"](), [7, 30, 1], [(12, 5)], hkv=2, g=3, seed=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
