"""Attention metadata for one engine step, built by the model runner and passed down explicitly.

The step's tokens are flattened into one row of T tokens, decodes first:

    tokens:   | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |
               <- num_decodes ->  <---- prefill chunks ---->

A decode row has exactly one new token; a prefill chunk has q_len >= 1 new tokens that continue a
sequence whose first (seq_len - q_len) tokens are already in the cache (prefix hits or earlier chunks).

slot_mapping[t] = block_table[pos // block_size] * block_size + pos % block_size is where token t's
K and V are written; attention then reads the first seq_len slots of each sequence via its block table.

Gather indices address a layer's cache viewed as [2 * num_blocks, block_size, Hkv, D] (K blocks, then V
blocks): for a table [b0, b1, ...] the index is [b0, b1, ..., N + b0, N + b1, ...] with N = num_blocks,
so one index_select along dim 0 (the fastest gather on CPU) fetches K and V together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    # Decode rows (the first num_decodes tokens).
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [Nd, max_blocks] int64 (padded with 0; masked by seq_lens)
    decode_kv_index: torch.Tensor | None  # [2 * Nd * max_blocks] int64: gather index (see above)
    decode_seq_lens: torch.Tensor | None  # [Nd] int64: context length including the new token
    decode_key_mask: torch.Tensor | None  # [Nd, 1, 1, max_blocks*block_size] bool: True = attend
    # Prefill chunks, one entry per sequence, in row order after the decodes.
    prefill_query_lens: list[int]
    prefill_seq_lens: list[int]
    prefill_block_tables: list[torch.Tensor]  # each [ceil(seq_len / block_size)] int64
    prefill_kv_indices: list[torch.Tensor]  # each [2 * ceil(seq_len / block_size)]: gather index

    @staticmethod
    def kv_index(block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
        flat = block_table.reshape(-1)
        return torch.cat((flat, flat + num_blocks))

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_query_lens)
