"""The native CPU kernels against their PyTorch definitions, their fallbacks, and the engine with them on/off."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from tierlm.kernels import cpu as K

HAVE_CC = K._compiler() is not None


def test_kernels_build_where_a_compiler_exists():
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine: the PyTorch paths are used")
    assert K.usable(torch.zeros(1))
    assert not K.usable(torch.zeros(1, dtype=torch.bfloat16))
    # the weight-quantized kernels' own self-check (kernels/quant.py): a failure there turns the native path off
    # quietly and their tests into skips, so it fails here
    from tierlm.kernels import quant as kq

    assert kq.qmatmul_usable(), "the library built, so its quantized matmul failed the self-check"


def make_case(nd, hkv, g, d, bs, lens, seed):
    """A pool whose unused blocks hold NaN, so reading past a sequence's length poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    mb = max((n + bs - 1) // bs for n in lens)
    nb = nd * mb + 3
    kv = torch.full((2, nb, bs, hkv, d), float("nan"))
    perm = torch.randperm(nb, generator=gen)
    tables = torch.zeros(nd, mb, dtype=torch.long)
    for i, n in enumerate(lens):
        used = (n + bs - 1) // bs
        blocks = perm[i * mb: i * mb + used]
        tables[i, :used] = blocks
        tables[i, used:] = perm[-1]  # padding entries point at a NaN block
        data = torch.randn(2, used * bs, hkv, d, generator=gen)
        data[:, n:] = float("nan")  # slots past the length in the last block
        kv[:, blocks] = data.view(2, used, bs, hkv, d)
    q = torch.randn(nd, hkv * g, d, generator=gen)
    return q, kv, tables, torch.tensor(lens)


def clean_reference(q, kv, tables, lens, scale):
    return K.reference_decode(q, torch.nan_to_num(kv, nan=0.0), tables, lens, scale)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 3), (3, 3), (4, 4), (1, 8)])
@pytest.mark.parametrize("d,bs", [(16, 4), (64, 16), (128, 16), (32, 32)])
def test_paged_decode_matches_dense(hkv, g, d, bs):
    lens = [1, bs, bs + 1, 3 * bs - 1, 300]
    q, kv, tables, lens_t = make_case(len(lens), hkv, g, d, bs, lens, seed=hkv * 100 + g * 10 + d)
    out = K.paged_decode(q, kv, tables, lens_t, d ** -0.5)
    assert out is not None and not out.isnan().any()
    torch.testing.assert_close(out, clean_reference(q, kv, tables, lens_t, d ** -0.5), atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_paged_decode_declines_shapes_beyond_its_scratch():
    q, kv, tables, lens = make_case(1, 1, 64, 128, 256, [5], seed=0)  # 64 heads x 256-token blocks
    assert K.paged_decode(q, kv, tables, lens, 0.1) is None


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("shape", [(1, 24), (16, 576), (3, 7, 64), (600, 576)])  # the last one runs threaded
def test_add_rms_norm_matches_torch(shape):
    gen = torch.Generator().manual_seed(1)
    x, r = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    w = torch.randn(shape[-1], generator=gen)
    out, res = K.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (shape[-1],), w, 1e-5), atol=1e-5, rtol=1e-5)
    out, same = K.add_rms_norm(x, None, w, 1e-5)
    assert same is x
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERLM_CACHE_DIR", str(tmp_path))
    K._library.cache_clear()
    yield tmp_path
    K._library.cache_clear()


def test_a_failed_build_falls_back_and_says_so(fresh_library, monkeypatch, caplog):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary")
    monkeypatch.setenv("CC", false)
    monkeypatch.setattr(K.shutil, "which", lambda name: false)
    with caplog.at_level(logging.WARNING, logger="tierlm.kernels.cpu"):
        assert K._library() is None
    assert "failed" in caplog.text
    assert not K.usable(torch.zeros(1))
    st = K.status()
    assert not st["native"] and st["library"] is None and st["reason"].startswith("build failed")
    assert not list((fresh_library / "kernels").glob("*.so"))  # no half-written library left behind


def test_switch_turns_kernels_off(fresh_library, monkeypatch):
    monkeypatch.setenv(K.ENV_SWITCH, "0")
    assert K._library() is None and not K.usable(torch.zeros(1))
    assert K.status() == {"native": False, "library": None, "reason": "turned off by TIERLM_CPU_KERNELS=0"}


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_build_is_cached_by_content(fresh_library):
    assert K._library() is not None
    built = list((fresh_library / "kernels").glob("cpu-*.so"))
    assert len(built) == 1
    K._library.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert K._library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_default_model_greedy_is_the_same_with_kernels_off(default_llm, monkeypatch):
    from tierlm import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    from tierlm.attention import TorchPagedBackend

    assert default_llm.engine.runner.backend.name == "cpu"  # native decode kernel + mask-free prefill
    on = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]
    monkeypatch.setattr(K, "usable", lambda *t: False)  # the fused add + RMSNorm kernel off
    monkeypatch.setattr(default_llm.engine.runner, "backend", TorchPagedBackend())  # gather + SDPA everywhere
    off = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]
    assert on == off
