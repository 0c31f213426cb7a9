"""KV-cache memory arithmetic: exact bytes per token and per block for every KV format.

Every byte count in the engine comes from here; the formats themselves are entries of the one
registry (tierlm.core.registry.KV_FORMATS), so a new KV format changes one registry entry and nothing else.

Layout counted by `KVSpec.bytes_per_token` (one token, all layers):

    2 (K and V) x num_layers x num_kv_heads x per_head_bytes
    per_head_bytes = head_dim x element_bytes + scales_per_head x scale_bytes
    scales_per_head = head_dim / scale_group (grouped FP8), 1 (one scale per head), 0 (unscaled or static)

A scale group never spans two heads: a group size that does not divide head_dim is refused. Static FP8
scales (one per layer, K/V and head) are not per token, so they add nothing here. State a model keeps per
token beside its KV (a V4-mini's Engram conv values: hidden fp32 values per Engram layer) is `state_bytes_per_token`,
counted in every total here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tierlm.core.errors import InvalidParameterError
from tierlm.core.registry import KV_FORMATS, KVFormat, get_kv_format, implemented_kv_formats

KV_FORMAT_REGISTRY = KV_FORMATS  # the registry's table, under the name kvcache callers know
__all__ = ["KV_FORMAT_REGISTRY", "KVFormat", "KVSpec", "get_kv_format", "implemented_kv_formats"]

if TYPE_CHECKING:
    import torch

    from tierlm.config import ModelConfig


def engram_state_bytes(model_config) -> int:
    """Bytes per token of a V4-mini's Engram conv state: each Engram layer's gated value (hidden fp32), paged like
    the KV so a prefix hit or a tier load restores it too; 0 without Engram or without its conv."""
    e = getattr(model_config, "engram", None)
    return 0 if e is None or not e.conv else len(e.layers) * model_config.hidden_size * 4


@dataclass(frozen=True)
class KVSpec:
    """The shape of the paged KV cache of one model in one format. All sizes are exact integers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_format: str
    block_size: int
    state_bytes_per_token: int = 0  # per-token model state kept with the KV (paged, moved through the tiers with it)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"KVSpec.{name} must be a positive integer, got {value!r}")
        get_kv_format(self.kv_format).check_head_dim(self.head_dim)

    @classmethod
    def from_model(cls, model_config: ModelConfig, kv_format: str, block_size: int = 16) -> KVSpec:
        return cls(
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            kv_format=kv_format,
            block_size=block_size,
            state_bytes_per_token=engram_state_bytes(model_config),
        )

    @property
    def format(self) -> KVFormat:
        return get_kv_format(self.kv_format)

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.format.torch_dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers and KV heads, scales included, and the model's per-token state."""
        return 2 * self.num_layers * self.num_kv_heads * self.format.bytes_per_head(self.head_dim) \
            + self.state_bytes_per_token

    @property
    def page_size_bytes(self) -> int:
        """One block (block_size tokens) across all layers."""
        return self.bytes_per_token * self.block_size

    def num_blocks_for_budget(self, memory_bytes: int) -> int:
        """Whole blocks that fit in `memory_bytes` (0 if not even one does)."""
        if memory_bytes < 0:
            raise InvalidParameterError(f"memory budget {memory_bytes} < 0", "give a non-negative byte count")
        return memory_bytes // self.page_size_bytes

    def blocks_per_sequence(self, seq_len: int) -> int:
        """Blocks one sequence of `seq_len` tokens occupies (its last block may be partly empty)."""
        return -(-seq_len // self.block_size)

    def max_sessions(self, memory_bytes: int, seq_len: int, shared_prefix: int = 0) -> int:
        """Sequences of `seq_len` tokens that fit in `memory_bytes` at once, each in whole blocks.

        The one definition of "max sessions" (`tierlm info` and `tierlm bench` both use it). With
        `shared_prefix` tokens common to every session and a prefix cache, the full blocks of that prefix
        are stored once and shared; the rest of each session (from the first block the prefix does not
        fill) is its own:

            sessions = (blocks in budget - shared blocks) // (blocks per session - shared blocks)
        """
        if seq_len < 1:
            raise InvalidParameterError(f"seq_len {seq_len} < 1", "give a sequence length of at least one token")
        if not 0 <= shared_prefix <= seq_len:
            raise InvalidParameterError(f"shared_prefix {shared_prefix} is not in [0, seq_len {seq_len}]",
                                        "give the tokens every session shares, at most the session length")
        budget_blocks = self.num_blocks_for_budget(memory_bytes)
        shared = min(shared_prefix // self.block_size, self.blocks_per_sequence(seq_len) - 1)
        if budget_blocks < self.blocks_per_sequence(seq_len):
            return 0
        return (budget_blocks - shared) // (self.blocks_per_sequence(seq_len) - shared)
