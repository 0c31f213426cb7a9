"""KVSpec arithmetic: exact byte counts for the default model (SmolLM2-135M: 30 layers, 3 KV heads, d=64)."""
import pytest
import torch

from tierlm.config import CacheConfig, ModelConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.kvcache.spec import KV_FORMAT_REGISTRY, KVSpec, implemented_kv_formats

SMOLLM2 = ModelConfig(
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
)


def smol(kv_format: str, block_size: int = 16) -> KVSpec:
    return KVSpec.from_model(SMOLLM2, kv_format, block_size)


@pytest.mark.parametrize(
    ("kv_format", "bytes_per_token"),
    [
        ("fp32", 46_080),
        ("bf16", 23_040),  # 2 * 30 * 3 * 64 * 2
        ("fp16", 23_040),
        ("fp8_e4m3", 12_240),  # 2 * 30 * 3 * (64 + one fp32 scale per head)
        ("fp8_e5m2", 12_240),
        ("fp8_e4m3_ue8m0", 11_700),  # 2 * 30 * 3 * (64 + one UE8M0 byte per head)
        ("fp8_e4m3_g64", 12_240),  # head_dim 64: one group per head
        ("fp8_e5m2_g64_ue8m0", 11_700),
        ("fp8_e4m3_static", 11_520),  # 2 * 30 * 3 * 64: static scales are per layer, not per token
    ],
)
def test_bytes_per_token_smollm2(kv_format, bytes_per_token):
    assert smol(kv_format).bytes_per_token == bytes_per_token
    assert smol(kv_format).page_size_bytes == 16 * bytes_per_token


def test_from_model_copies_the_shape():
    assert smol("bf16", 32) == KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, kv_format="bf16", block_size=32)


def test_scale_groups_never_span_heads():
    """A group must divide head_dim: 128 over a head of 96 (or of 64) is refused, one per head always fits."""
    assert KVSpec(1, 1, 128, "fp8_e4m3_g64_ue8m0", 16).bytes_per_token == 2 * (128 + 2)
    assert KVSpec(1, 1, 96, "fp8_e4m3", 16).bytes_per_token == 2 * (96 + 4)
    for fmt, hd in (("fp8_e4m3_g64", 96), ("fp8_e4m3_g128", 64)):
        with pytest.raises(InvalidParameterError, match=f"does not divide head_dim {hd}"):
            KVSpec(1, 1, hd, fmt, 16)


def test_fp8_is_at_least_45_percent_below_bf16_and_70_below_fp32():
    """The issue's memory targets, from the exact byte counts (scales included) of the default model."""
    for fmt in ("fp8_e4m3", "fp8_e4m3_ue8m0", "fp8_e5m2"):
        b = smol(fmt).bytes_per_token
        assert b <= 0.55 * smol("bf16").bytes_per_token and b <= 0.30 * smol("fp32").bytes_per_token, fmt


def test_num_blocks_for_budget_counts_whole_blocks():
    spec = smol("bf16")  # page 368,640 B
    assert spec.page_size_bytes == 368_640
    assert spec.num_blocks_for_budget(10 * 368_640) == 10
    assert spec.num_blocks_for_budget(10 * 368_640 - 1) == 9
    assert spec.num_blocks_for_budget(368_639) == 0
    assert spec.num_blocks_for_budget(1 << 30) == 2912


def test_max_sessions_counts_whole_blocks_per_session():
    spec = smol("bf16")
    assert spec.max_sessions(1 << 30, 8192) == 5  # 2912 blocks // 512 blocks per session
    assert spec.max_sessions(4 * 368_640, 17) == 2  # 17 tokens take 2 blocks
    assert spec.max_sessions(4 * 368_640, 16) == 4
    assert spec.max_sessions(368_639, 1) == 0
    with pytest.raises(InvalidParameterError):
        spec.max_sessions(1 << 30, 0)


def test_max_sessions_stores_a_shared_prefix_once():
    spec = smol("fp32")  # 737,280 B per 16-token block
    budget = 100 * spec.page_size_bytes
    assert spec.max_sessions(budget, 160) == 10  # 10 blocks each
    assert spec.max_sessions(budget, 160, shared_prefix=128) == (100 - 8) // (10 - 8)  # 8 shared blocks, 2 own
    assert spec.max_sessions(budget, 160, shared_prefix=135) == 46  # a partial block is not shared
    assert spec.max_sessions(budget, 160, shared_prefix=160) == 91  # at least the last block is each session's own
    assert spec.max_sessions(5 * spec.page_size_bytes, 160, shared_prefix=128) == 0  # not even one session
    with pytest.raises(InvalidParameterError, match="shared_prefix"):
        spec.max_sessions(budget, 160, shared_prefix=161)


def test_torch_dtype_for_implemented_formats_and_a_clear_error_for_planned_ones():
    assert smol("bf16").torch_dtype is torch.bfloat16
    assert smol("fp32").torch_dtype is torch.float32
    assert smol("fp16").torch_dtype is torch.float16
    assert smol("fp8_e4m3").torch_dtype is torch.float8_e4m3fn and smol("fp8_e5m2_static").torch_dtype is torch.float8_e5m2
    from tierlm.core.registry import KVFormat

    with pytest.raises(InvalidParameterError, match="planned"):  # the mechanism a future format would use
        KVFormat("int4_future", 1, "uint8", implemented=False).torch_dtype


def test_registry_matches_the_formats_config_accepts():
    for name, fmt in KV_FORMAT_REGISTRY.items():
        if fmt.implemented:
            assert CacheConfig(kv_format=name).kv_format == name
        else:
            with pytest.raises(InvalidParameterError, match="planned"):
                CacheConfig(kv_format=name)
    with pytest.raises(InvalidParameterError, match="unknown KV format"):
        CacheConfig(kv_format="int3")
    fp8 = [n for n in implemented_kv_formats() if n.startswith("fp8")]
    assert implemented_kv_formats()[:3] == ("fp32", "bf16", "fp16") and len(fp8) == 14
    assert {KV_FORMAT_REGISTRY[n].scheme().fp8 for n in fp8} == {"e4m3", "e5m2"}


@pytest.mark.parametrize("bad", [dict(kv_format="int3"), dict(head_dim=0), dict(block_size=-16), dict(num_layers=1.5)])
def test_invalid_specs_are_refused(bad):
    args = dict(num_layers=30, num_kv_heads=3, head_dim=64, kv_format="bf16", block_size=16) | bad
    with pytest.raises(InvalidParameterError):
        KVSpec(**args)
