"""Turns a SchedulerOutput into tensors, runs the model, and returns logits for the rows that sample.

Owns the device KV cache: one tensor per layer, [2 (K, V), num_blocks, block_size, Hkv, D], allocated
once from the KVSpec. Block ids handed out by the KV manager index dim 1 directly.
"""
from __future__ import annotations

import torch

from tierlm.attention import AttentionMetadata
from tierlm.core.request import Request
from tierlm.kvcache import KVSpec
from tierlm.models.llama import LlamaForCausalLM
from tierlm.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, spec: KVSpec, num_blocks: int, device: torch.device):
        self.model = model
        self.spec = spec
        self.device = device
        self.block_size = spec.block_size
        self.num_blocks = num_blocks
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # Zero-filled: padded key positions are masked out, but 0 * NaN would still poison the output.
        self.kv_caches = [torch.zeros(shape, dtype=spec.torch_dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[Request]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        p_qlens: list[int] = []
        p_slens: list[int] = []
        p_tables: list[torch.Tensor] = []
        p_index: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        for s in out.scheduled:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            end = start + n
            table = s.block_table
            if s.is_decode:
                ids.append(req.token_id_at(start))
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                decode_tables.append(table[: (end + bs - 1) // bs])
                decode_lens.append(end)
            else:
                ids.extend(req.all_token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
                p_qlens.append(n)
                p_slens.append(end)
                p_tables.append(torch.tensor(table[: (end + bs - 1) // bs], dtype=torch.long, device=self.device))
                p_index.append(AttentionMetadata.kv_index(p_tables[-1], self.num_blocks))
            if end == req.num_tokens:  # caught up: this row's logits pick the next token
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(req)
        nd = len(decode_tables)
        dec_bt = dec_lens = dec_mask = dec_index = None
        if nd:
            mb = max(len(t) for t in decode_tables)
            dec_bt = torch.tensor([t + [0] * (mb - len(t)) for t in decode_tables], dtype=torch.long, device=self.device)
            dec_index = AttentionMetadata.kv_index(dec_bt, self.num_blocks)
            dec_lens = torch.tensor(decode_lens, dtype=torch.long, device=self.device)
            dec_mask = (torch.arange(mb * bs, device=self.device)[None, :] < dec_lens[:, None]).view(nd, 1, 1, mb * bs)
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decodes=nd, decode_block_tables=dec_bt, decode_kv_index=dec_index, decode_seq_lens=dec_lens,
            decode_key_mask=dec_mask, prefill_query_lens=p_qlens, prefill_seq_lens=p_slens,
            prefill_block_tables=p_tables, prefill_kv_indices=p_index,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, meta, sample_rows, sample_reqs

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[Request]]:
        """Run one step. Returns (logits [N, vocab] fp32 for the N requests that sample, those requests)."""
        input_ids, positions, meta, rows, reqs = self._prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not rows:
            return None, []
        return self.model.compute_logits(hidden[rows]), reqs
