"""Attention metadata for one engine step, built by the model runner and passed down explicitly.

The step's tokens are flattened into one row of T tokens, decodes first:

    tokens:   | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |
               <- num_decodes ->  <---- prefill chunks ---->

A decode row has exactly one new token; a prefill chunk has q_len >= 1 new tokens that continue a
sequence whose first (seq_len - q_len) tokens are already in the cache (prefix hits or earlier chunks).

slot_mapping[t] = block_table[pos // block_size] * block_size + pos % block_size is where token t's
K and V are written; attention then reads the first seq_len slots of each sequence via its block table:

    block_table  [b7, b2, b9]           (block_size 4, seq_len 10)
    positions     0..3 | 4..7 | 8 9 . .
    slots        28..31| 8..11| 36 37

This is backend-neutral. What a backend derives from it once per step (gather indices, masks) goes in
`backend_state`, filled by `AttentionBackend.prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    # Decode rows (the first num_decodes tokens).
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [Nd, max_blocks] int64 (padded with 0; bounded by seq_lens)
    decode_seq_lens: torch.Tensor | None  # [Nd] int64: context length including the new token
    # Prefill chunks, one entry per sequence, in row order after the decodes.
    prefill_query_lens: list[int] = field(default_factory=list)
    prefill_seq_lens: list[int] = field(default_factory=list)
    prefill_block_tables: list[torch.Tensor] = field(default_factory=list)  # each [ceil(seq_len / block_size)] int64
    backend_state: object = None  # per-step derived state of the backend that runs the step

    def prefill_rows(self):
        """(first row, q_len, seq_len, block table) of every prefill chunk, in row order."""
        row = self.num_decodes
        for q_len, seq_len, table in zip(self.prefill_query_lens, self.prefill_seq_lens, self.prefill_block_tables):
            yield row, q_len, seq_len, table
            row += q_len


def kv_index(block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Gather index into a layer's cache viewed as [2 * num_blocks, block_size, Hkv, D] (K blocks, then V
    blocks): for a table [b0, b1, ...] it is [b0, b1, ..., N + b0, N + b1, ...] with N = num_blocks, so one
    index_select along dim 0 (the fastest gather on CPU) fetches K and V together."""
    flat = block_table.reshape(-1)
    return torch.cat((flat, flat + num_blocks))
