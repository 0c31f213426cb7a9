"""The native FP8 paged decode kernel (cpu.c, tierlm_paged_decode_fp8) against its PyTorch definition
(`reference_decode_fp8`), its FP8 -> fp32 widening against torch's own conversion, its accuracy against the fp32
kernel on the cache it was quantized from, its argument checks, its fallbacks, and its portable builds."""
from __future__ import annotations

import ctypes
import platform
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tierlm.kernels import cpu as K

HAVE_CC = K._compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the PyTorch paths are used")

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
GROUPINGS = ["head", "d64", "d32", "d16", "d8", "static"]  # d8: groups of 8 values, off the 16-wide vector path


def n_groups(grouping: str, d: int) -> int | None:
    """The scales' group count for a grouping ("d32": groups of 32 values); None for static [2, Hkv] scales."""
    if grouping == "static":
        return None
    return 1 if grouping == "head" else d // int(grouping[1:])


def quantize(x: torch.Tensor, fp8: str, scale_type: str, groups: int | None):
    """x: fp32 [2, nb, bs, Hkv, D] -> (uint8 bytes of x's shape, scales): per token [2, nb, bs, Hkv, groups]
    (amax of each group / fmax), or static [2, Hkv] (amax over the layer) when groups is None. fp32 scales as
    float32, ue8m0 as uint8 exponents (the power of two at or above amax / fmax, + 127)."""
    two, nb, bs, hkv, d = x.shape
    fmax = FMAX[fp8]
    g = groups or 1
    if groups is None:
        amax, shape = x.abs().amax(dim=(1, 2, 4)), (2, 1, 1, hkv, 1, 1)
    else:
        amax, shape = x.view(two, nb, bs, hkv, g, d // g).abs().amax(-1), (two, nb, bs, hkv, g, 1)
    if scale_type == "fp32":
        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        stored = scale
    else:
        e = torch.where(amax > 0, torch.ceil(torch.log2(amax / fmax)), torch.zeros_like(amax)).clamp(-127, 127)
        scale, stored = torch.exp2(e), (e + 127).to(torch.uint8)
    y = (x.view(two, nb, bs, hkv, g, d // g) / scale.view(shape)).clamp(-fmax, fmax)
    return y.to(DTYPES[fp8]).view(torch.uint8).view(x.shape), stored.contiguous()


def make_case(lens, hkv, g, d, bs, fp8, scale_type, groups, seed):
    """A quantized pool whose slots outside every sequence are poisoned: the largest code of the format and,
    with per-token scales, the largest scale, so reading one makes the output non-finite (static scales: a
    large finite value, which the comparison with the reference catches)."""
    gen = torch.Generator().manual_seed(seed)
    nd = len(lens)
    mb = max((n + bs - 1) // bs for n in lens)
    nb = nd * mb + 3
    kv = torch.zeros(2, nb, bs, hkv, d)
    valid = torch.zeros(nb, bs, dtype=torch.bool)
    perm = torch.randperm(nb, generator=gen)
    tables = torch.zeros(nd, mb, dtype=torch.long)
    for i, n in enumerate(lens):
        used = (n + bs - 1) // bs
        blocks = perm[i * mb: i * mb + used]
        tables[i, :used] = blocks
        tables[i, used:] = perm[-1]  # padding entries point at a poisoned block
        kv[:, blocks] = torch.randn(2, used, bs, hkv, d, generator=gen)
        valid.view(-1)[(blocks[:, None] * bs + torch.arange(bs)).view(-1)[:n]] = True
    data, scales = quantize(kv, fp8, scale_type, groups)
    data[:, ~valid] = torch.tensor(FMAX[fp8]).to(DTYPES[fp8]).view(torch.uint8)
    if groups is not None:
        scales[:, ~valid] = 3e38 if scale_type == "fp32" else 254
    q = torch.randn(nd, hkv * g, d, generator=gen)
    return q, kv, data, scales, tables, torch.tensor(lens)


def check_against_reference(lens, hkv, g, d, bs, fp8, scale_type, grouping, seed):
    groups = n_groups(grouping, d)
    q, _, data, scales, tables, lens_t = make_case(lens, hkv, g, d, bs, fp8, scale_type, groups, seed)
    scale = d ** -0.5
    out = K.paged_decode_fp8(q, data, scales, fp8, scale_type, tables, lens_t, scale)
    assert out is not None and out.isfinite().all()
    want = K.reference_decode_fp8(q, data, scales, fp8, scale_type, tables, lens_t, scale)
    assert want.isfinite().all()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


# ---- widening --------------------------------------------------------------------------------------------
EVERY_BYTE = torch.arange(256, dtype=torch.uint8)


def assert_widening_matches_torch(widen, fp8):
    """widen(bytes, fp8, scale) -> float32, for every byte: bit-equal to torch's float8 -> float32 (times the
    scale) except e4m3's two NaN encodings, which the kernel does not handle (its quantizer never writes them)."""
    want = EVERY_BYTE.view(DTYPES[fp8]).to(torch.float32)
    nan = want.isnan()
    assert nan.nonzero().view(-1).tolist() == ([0x7F, 0xFF] if fp8 == "e4m3" else list(range(0x7D, 0x80)) +
                                              list(range(0xFD, 0x100)))
    for scale in (1.0, 0.375, 2.0 ** -20):
        for got in (widen(EVERY_BYTE, fp8, scale),  # the vector path: 256 = 16 x 16
                    torch.cat([widen(part, fp8, scale) for part in EVERY_BYTE.split(7)]),  # and the tail
                    torch.cat([widen(part, fp8, scale) for part in EVERY_BYTE.split(23)])):
            assert torch.equal(got[~nan].view(torch.int32), (want[~nan] * scale).view(torch.int32))
            if fp8 == "e5m2":
                assert got[nan].isnan().all()
                assert torch.equal(got[[0x7C, 0xFC]], torch.tensor([float("inf"), float("-inf")]))


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_widening_of_every_byte_matches_torch(fp8):
    assert_widening_matches_torch(K.fp8_widen, fp8)
    got = K.fp8_widen(EVERY_BYTE, fp8)
    if fp8 == "e4m3":  # the documented NaN behaviour, so a change to it is seen
        assert got[0x7F].item() == 480.0 and got[0xFF].item() == -480.0
    assert torch.equal(torch.signbit(got), torch.signbit(EVERY_BYTE.view(DTYPES[fp8]).to(torch.float32)))


# ---- against the PyTorch definition -----------------------------------------------------------------------
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("scale_type", ["fp32", "ue8m0"])
@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_fp8_decode_matches_reference(fp8, scale_type, grouping, d):
    bs = 16
    check_against_reference([1, bs, bs + 1, 3 * bs - 1, 150], 3, 3, d, bs, fp8, scale_type, grouping,
                            seed=d + len(grouping) * 7 + len(scale_type) + len(fp8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hkv=st.sampled_from([1, 2, 3, 4]), g=st.sampled_from([1, 2, 3, 8]), d=st.sampled_from([64, 128]),
       bs=st.sampled_from([1, 4, 16, 32]), grouping=st.sampled_from(GROUPINGS),
       fp8=st.sampled_from(["e4m3", "e5m2"]), scale_type=st.sampled_from(["fp32", "ue8m0"]),
       lens=st.lists(st.integers(1, 80), min_size=1, max_size=4), seed=st.integers(0, 2 ** 16))
@example(hkv=1, g=1, d=64, bs=16, grouping="head", fp8="e4m3", scale_type="fp32", lens=[1], seed=0)
@example(hkv=2, g=8, d=128, bs=32, grouping="d32", fp8="e5m2", scale_type="ue8m0", lens=[1, 33, 64], seed=1)
@example(hkv=4, g=2, d=64, bs=1, grouping="static", fp8="e4m3", scale_type="ue8m0", lens=[1, 5], seed=2)
def test_fp8_decode_matches_reference_on_random_shapes(hkv, g, d, bs, grouping, fp8, scale_type, lens, seed):
    check_against_reference(lens, hkv, g, d, bs, fp8, scale_type, grouping, seed)


def test_scales_are_read_through_their_strides():
    """Per-token scales as a view with a padded group dim and static scales as a transposed view: the same
    output as with contiguous copies."""
    d, groups = 64, 2
    q, kv, data, scales, tables, lens = make_case([7, 40], 3, 3, d, 16, "e4m3", "fp32", groups, seed=3)
    want = K.paged_decode_fp8(q, data, scales, "e4m3", "fp32", tables, lens, 0.125)
    padded = torch.full((*scales.shape[:-1], groups + 3), float("nan"))
    padded[..., :groups] = scales
    view = padded[..., :groups]
    assert not view.is_contiguous()
    assert torch.equal(K.paged_decode_fp8(q, data, view, "e4m3", "fp32", tables, lens, 0.125), want)

    data_s, static = quantize(kv, "e4m3", "fp32", None)
    want = K.paged_decode_fp8(q, data_s, static, "e4m3", "fp32", tables, lens, 0.125)
    transposed = static.t().contiguous().t()
    assert transposed.stride() == (1, 2)
    assert torch.equal(K.paged_decode_fp8(q, data_s, transposed, "e4m3", "fp32", tables, lens, 0.125), want)
    torch.testing.assert_close(want, K.reference_decode_fp8(q, data_s, static, "e4m3", "fp32", tables, lens, 0.125),
                               rtol=1e-4, atol=1e-5)


def test_fp8_dtypes_are_taken_as_their_bytes():
    q, _, data, scales, tables, lens = make_case([5, 20], 2, 2, 64, 16, "e5m2", "ue8m0", 1, seed=4)
    want = K.paged_decode_fp8(q, data, scales, "e5m2", "ue8m0", tables, lens, 0.125)
    e8m0 = scales.view(torch.float8_e8m0fnu) if hasattr(torch, "float8_e8m0fnu") else scales
    got = K.paged_decode_fp8(q, data.view(torch.float8_e5m2), e8m0, "e5m2", "ue8m0", tables, lens, 0.125)
    assert torch.equal(got, want)
    torch.testing.assert_close(want, K.reference_decode_fp8(q, data.view(torch.float8_e5m2), e8m0, "e5m2", "ue8m0",
                                                            tables, lens, 0.125), rtol=1e-4, atol=1e-5)
    assert K.usable_fp8(q, data.view(torch.float8_e5m2)) and K.usable_fp8(q, data)
    assert not K.usable_fp8(q.bfloat16(), data) and not K.usable_fp8(q, data.float())


def test_bad_arguments_are_refused():
    q, _, data, scales, tables, lens = make_case([5], 2, 2, 64, 16, "e4m3", "fp32", 2, seed=5)
    call = lambda **kw: K.paged_decode_fp8(**{**dict(q=q, data=data, scales=scales, fp8="e4m3", scale_type="fp32",
                                                     block_tables=tables, seq_lens=lens, scale=0.1), **kw})
    with pytest.raises(ValueError, match="fp8 must be"):
        call(fp8="e3m4")
    with pytest.raises(ValueError, match="not the e5m2 format"):
        call(data=data.view(torch.float8_e4m3fn), fp8="e5m2")
    with pytest.raises(ValueError, match="scale_type"):
        call(scale_type="fp16")
    with pytest.raises(ValueError, match="fp32 scales must be float32"):
        call(scales=scales.double())
    with pytest.raises(ValueError, match="ue8m0 scales must be one byte"):
        call(scale_type="ue8m0")
    with pytest.raises(ValueError, match="do not fit"):
        call(scales=scales[:, :-1])
    with pytest.raises(ValueError, match="do not fit"):
        call(scales=torch.ones(2, 3))
    with pytest.raises(ValueError, match="do not fit"):
        call(scales=torch.ones(*scales.shape[:-1], 3))  # 3 groups do not divide D = 64
    with pytest.raises(ValueError, match="per token"):
        call(scales=torch.ones(2))
    with pytest.raises(ValueError, match="do not fit together"):
        call(q=q[..., :32])
    with pytest.raises(ValueError, match="do not fit together"):
        call(block_tables=tables.int())
    with pytest.raises(ValueError, match="do not fit together"):
        call(q=torch.zeros(1, 3, 64))  # 3 query heads over 2 KV heads


# ---- accuracy against the fp32 kernel -----------------------------------------------------------------------
@pytest.mark.parametrize("fp8,scale_type,groups,bound", [
    ("e4m3", "fp32", 1, 0.1), ("e4m3", "ue8m0", 1, 0.1), ("e4m3", "fp32", None, 0.1), ("e5m2", "fp32", 2, 0.2)])
def test_fp8_decode_is_close_to_the_fp32_kernel_on_the_cache_it_came_from(fp8, scale_type, groups, bound):
    """A sanity bound on quantization error: the FP8 kernel on a quantized cache vs the fp32 kernel on the
    original (e4m3 measures ~0.04 relative error here, e5m2 ~0.07)."""
    lens = [1, 17, 300, 1000]
    q, kv, data, scales, tables, lens_t = make_case(lens, 3, 3, 64, 16, fp8, scale_type, groups, seed=6)
    want = K.paged_decode(q, kv, tables, lens_t, 0.125)
    got = K.paged_decode_fp8(q, data, scales, fp8, scale_type, tables, lens_t, 0.125)
    assert want is not None and got is not None
    for n in range(len(lens)):
        err = ((got[n] - want[n]).norm() / want[n].norm()).item()
        assert err < bound, f"sequence {n} (length {lens[n]}): relative error {err:.3f}"
    assert torch.equal(got[0], K.dequantize_fp8(data, scales, fp8, scale_type)[1, tables[0, 0], 0]
                       .repeat_interleave(3, dim=0))  # one token: the output is its dequantized V row, exactly


def test_fp8_decode_declines_shapes_beyond_its_scratch():
    q, _, data, scales, tables, lens = make_case([5], 1, 64, 128, 256, "e4m3", "fp32", 1, seed=0)
    assert K.paged_decode_fp8(q, data, scales, "e4m3", "fp32", tables, lens, 0.1) is None


# ---- the self-check and the portable builds ---------------------------------------------------------------
class Patched:
    """A loaded library with some entry points replaced."""

    def __init__(self, lib, **replaced):
        self._lib = lib
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._lib, name)


def test_self_check_covers_the_fp8_kernel_and_its_widening():
    lib = K._library()
    assert lib is not None and K._self_check(Patched(lib))
    assert not K._self_check(Patched(lib, tierlm_paged_decode_fp8=lambda *args: 1))
    wrong_scale = lambda q, data, scales, sk, fk, *rest: lib.tierlm_paged_decode_fp8(q, data, scales, 1 - sk, fk, *rest)
    assert not K._self_check(Patched(lib, tierlm_paged_decode_fp8=wrong_scale))
    swapped = lambda src, dst, n, kind, scale: lib.tierlm_fp8_widen(src, dst, n, 1 - kind, scale)
    assert not K._self_check(Patched(lib, tierlm_fp8_widen=swapped))


def build_variant(tmp_path, extra: list[str]) -> ctypes.CDLL:
    out = tmp_path / f"cpu{''.join(extra)}.so"
    subprocess.run([K._compiler(), *K.FLAGS, *extra, str(K.SOURCE), "-o", str(out), *K.LIBS], check=True,
                   capture_output=True, timeout=600)
    lib = ctypes.CDLL(str(out))
    K._declare(lib)
    return lib


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
@pytest.mark.parametrize("extra,width", [(["-mno-avx512f"], 8), (["-mno-avx512f", "-mno-f16c"], 1)])
def test_portable_builds_widen_and_decode_the_same(tmp_path, extra, width):
    """The F16C and table paths (what a machine without AVX-512 runs), built here with the wider paths off."""
    native = K._library()
    if native.tierlm_fp8_vector_width() != 16:
        pytest.skip("this machine's build is not the AVX-512 one")
    lib = build_variant(tmp_path, extra)
    assert lib.tierlm_fp8_vector_width() == width
    for fp8 in DTYPES:
        assert_widening_matches_torch(lambda b, f, s: K._fp8_widen(lib, b, f, s), fp8)
    assert K._self_check(lib)
    for fp8, scale_type, grouping in [("e4m3", "fp32", "d32"), ("e5m2", "ue8m0", "static")]:
        q, _, data, scales, tables, lens = make_case([1, 16, 70], 3, 3, 64, 16, fp8, scale_type,
                                                     n_groups(grouping, 64), seed=7)
        out = K._paged_decode_fp8(lib, q, data, scales, fp8, scale_type, tables, lens, 0.125)
        assert out is not None
        torch.testing.assert_close(out, K.reference_decode_fp8(q, data, scales, fp8, scale_type, tables, lens, 0.125),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_format", ["fp8_e4m3", "fp8_e5m2_g64", "fp8_e4m3_ue8m0", "fp8_e4m3_static"])
def test_native_widening_reads_blocks_exactly_as_the_reference(kv_format):
    """The cpu backend's prefill reads cached FP8 context with the kernel's widening: bit-for-bit the values
    of the reference dequantization (LayerKV.read_blocks without it), every scale layout."""
    from tierlm.core.registry import get_kv_format
    from tierlm.kvcache import KVSpec, KVStorage
    from tierlm.config import ModelConfig

    if not K.usable(torch.zeros(1)):
        pytest.skip(f"native kernels not in use: {K.status()['reason']}")
    cfg = ModelConfig("llama", 32, 64, 128, 1, 4, 2, 128, 256)
    layer = KVStorage(KVSpec.from_model(cfg, kv_format, 4), 8, "cpu")[0]
    if layer.static_scales is not None:
        layer.static_scales = torch.tensor([[0.05, 0.02], [0.01, 0.03]])
    torch.manual_seed(0)
    k, v = torch.randn(32, 2, 128) * 3, torch.randn(32, 2, 128)
    layer.write_slots(torch.randperm(32), k, v)
    index = torch.tensor([3, 0, 7, 8 + 3, 8 + 5, 8])
    widen = lambda raw: K.widen_fp8_rows(raw, get_kv_format(kv_format).scheme().fp8)  # noqa: E731
    ref, fast = layer.read_blocks(index), layer.read_blocks(index, widen)
    assert ref.dtype == fast.dtype == torch.float32 and torch.equal(ref, fast)
    assert ref.abs().sum() > 0
