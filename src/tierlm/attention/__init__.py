"""Attention ops over the paged KV cache. Metadata is explicit and passed in; there is no global context."""
from tierlm.attention.metadata import AttentionMetadata
from tierlm.attention.paged import paged_attention, write_kv

__all__ = ["AttentionMetadata", "paged_attention", "write_kv"]
