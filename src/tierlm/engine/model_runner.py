"""Turns a SchedulerOutput into tensors, runs the model, and returns logits for the rows that sample.

Holds, never creates alone: the model (any tierlm.models.base.CausalLM), the KV storage
(kvcache.KVStorage, which owns the KV tensors) and the attention backend, chosen once at construction
(tierlm.attention.select_backend). Per step it flattens the scheduled tokens (decodes first), builds the
backend-neutral AttentionMetadata, lets the backend derive its per-step state, and runs the model with an
AttentionContext. A model that reads more of a token's context than its id (a V4-mini: the earlier ids its
Engram N-grams hash, the slots of the earlier values its conv reads, `token_context`) gets them through
`begin_step` as soon as the step is laid out, so its memory rows are fetched while the step is still prepared,
and the next step's decode tokens through `hand_off` as soon as they are sampled (`prefetch_ahead`).
"""
from __future__ import annotations

import torch

from tierlm.attention import AttentionBackend, AttentionContext, AttentionMetadata
from tierlm.core.request import Request
from tierlm.kvcache.storage import KVStorage
from tierlm.models.base import CausalLM
from tierlm.scheduler import SchedulerOutput


def _earlier_ids(req: Request, pos: int, width: int) -> list[int]:
    """The `width` token ids before position `pos` of `req` (-1 before the sequence's start)."""
    return [req.token_id_at(q) if q >= 0 else -1 for q in range(pos - width, pos)]


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVStorage, backend: AttentionBackend, device: torch.device,
                 selector=None):
        self.selector = selector  # attention.sparse selector (None: dense)
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.block_size = kv.spec.block_size
        self.num_ids = kv.num_ids  # device blocks and spill ids (kvcache/spill.py): what tables may hold
        self.token_context = getattr(model, "token_context", None)  # (earlier ids, conv taps) or None

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv.nbytes

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
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        history: list[list[int]] = []
        taps: list[list[int]] = []
        width, back = self.token_context or (0, ())
        for s in out.scheduled:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            end = start + n
            table = s.block_table
            if self.token_context is not None:
                for p in range(start, end):
                    history.append(_earlier_ids(req, p, width))
                    taps.append([table[(p - d) // bs] * bs + (p - d) % bs if p >= d else -1 for d in back])
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
            if end == req.num_tokens:  # caught up: this row's logits pick the next token
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(req)
        nd = len(decode_tables)
        dec_bt = dec_lens = None
        if nd:
            mb = max(len(t) for t in decode_tables)
            dec_bt = torch.tensor([t + [0] * (mb - len(t)) for t in decode_tables], dtype=torch.long, device=self.device)
            dec_lens = torch.tensor(decode_lens, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            block_size=bs, slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decodes=nd, decode_block_tables=dec_bt, decode_seq_lens=dec_lens,
            prefill_query_lens=p_qlens, prefill_seq_lens=p_slens, prefill_block_tables=p_tables,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self.token_context is not None:
            self.model.begin_step(input_ids, torch.tensor(history, dtype=torch.long).view(len(ids), width),
                                  torch.tensor(taps, dtype=torch.long).view(len(ids), len(back)) if back else None)
        self.backend.prepare(meta, self.num_ids)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, meta, sample_rows, sample_reqs

    def hand_off(self, reqs: list[Request], token_ids: list[int]) -> None:
        """This step's sampled tokens, each its request's next decode input: a model that reads memory by token id
        (V4-mini) starts fetching their rows now, while the engine detokenizes, checks stops and schedules."""
        if self.token_context is None or not reqs:
            return
        width = self.token_context[0]
        history = [_earlier_ids(req, req.num_tokens, width) for req in reqs]
        self.model.prefetch_ahead(torch.tensor(token_ids, dtype=torch.long),
                                  torch.tensor(history, dtype=torch.long).view(len(reqs), width))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[Request]]:
        """Run one step. Returns (logits [N, vocab] fp32 for the N requests that sample, those requests)."""
        input_ids, positions, meta, rows, reqs = self._prepare(out)
        if self.kv.spill is not None:
            self.kv.spill.begin_step()
        hidden = self.model(input_ids, positions, AttentionContext(meta, self.kv, self.backend, self.selector))
        if not rows:
            return None, []
        return self.model.compute_logits(hidden[rows]), reqs
