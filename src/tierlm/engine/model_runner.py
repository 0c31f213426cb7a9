"""Turns a SchedulerOutput into tensors, runs the model, and returns logits for the rows that sample.

Holds, never creates alone: the model (any tierlm.models.base.CausalLM), the KV storage
(kvcache.KVStorage, which owns the KV tensors) and the attention backend, chosen once at construction
(tierlm.attention.select_backend). Per step it flattens the scheduled tokens (decodes first), builds the
backend-neutral AttentionMetadata, lets the backend derive its per-step state, and runs the model with an
AttentionContext. The step is first laid out as host lists (StepLayout); a pure-decode step that captured
graphs accept (engine/captured.py, CUDA) is copied into their static buffers and replayed instead. A model
that reads more of a token's context than its id (a V4-mini: the earlier ids its Engram N-grams hash, the slots
of the earlier values its conv reads, `token_context`) gets them through `begin_step` as soon as the step is laid
out, so its memory rows are fetched while the step is still prepared, and the next step's decode tokens through
`hand_off` as soon as they are sampled (`prefetch_ahead`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tierlm.attention import AttentionBackend, AttentionContext, AttentionMetadata
from tierlm.core.request import Request
from tierlm.kvcache.storage import KVStorage
from tierlm.models.base import CausalLM
from tierlm.scheduler import SchedulerOutput


@dataclass
class StepLayout:
    """One step's rows as host lists, decodes first (see attention/metadata.py for the row order)."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefill_qlens: list[int] = field(default_factory=list)
    prefill_lens: list[int] = field(default_factory=list)
    prefill_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_reqs: list[Request] = field(default_factory=list)
    history: list[list[int]] = field(default_factory=list)  # token_context models only
    taps: list[list[int]] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        """Every row a decode, and every decode samples (the shape a captured step has)."""
        return not self.prefill_qlens and len(self.sample_rows) == len(self.ids)


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
        self.graphs = None  # engine.captured.DecodeGraphs: pure-decode steps replayed from captured graphs

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv.nbytes

    def _layout(self, out: SchedulerOutput) -> StepLayout:
        """The step's rows as host lists (decodes first): what the eager path makes tensors of and a captured
        step copies into its static buffers."""
        bs = self.block_size
        lay = StepLayout()
        width, back = self.token_context or (0, ())
        for s in out.scheduled:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            end = start + n
            table = s.block_table
            if self.token_context is not None:
                for p in range(start, end):
                    lay.history.append(_earlier_ids(req, p, width))
                    lay.taps.append([table[(p - d) // bs] * bs + (p - d) % bs if p >= d else -1 for d in back])
            if s.is_decode:
                lay.ids.append(req.token_id_at(start))
                lay.positions.append(start)
                lay.slots.append(table[start // bs] * bs + start % bs)
                lay.decode_tables.append(table[: (end + bs - 1) // bs])
                lay.decode_lens.append(end)
            else:
                lay.ids.extend(req.all_token_ids[start:end])
                lay.positions.extend(range(start, end))
                lay.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
                lay.prefill_qlens.append(n)
                lay.prefill_lens.append(end)
                lay.prefill_tables.append(table[: (end + bs - 1) // bs])
            if end == req.num_tokens:  # caught up: this row's logits pick the next token
                lay.sample_rows.append(len(lay.ids) - 1)
                lay.sample_reqs.append(req)
        return lay

    def _prepare(self, lay: StepLayout) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs, dev = self.block_size, self.device
        nd = len(lay.decode_tables)
        dec_bt = dec_lens = None
        if nd:
            mb = max(len(t) for t in lay.decode_tables)
            dec_bt = torch.tensor([t + [0] * (mb - len(t)) for t in lay.decode_tables], dtype=torch.long, device=dev)
            dec_lens = torch.tensor(lay.decode_lens, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            block_size=bs, slot_mapping=torch.tensor(lay.slots, dtype=torch.long, device=dev),
            num_decodes=nd, decode_block_tables=dec_bt, decode_seq_lens=dec_lens,
            prefill_query_lens=lay.prefill_qlens, prefill_seq_lens=lay.prefill_lens,
            prefill_block_tables=[torch.tensor(t, dtype=torch.long, device=dev) for t in lay.prefill_tables],
        )
        input_ids = torch.tensor(lay.ids, dtype=torch.long, device=dev)
        if self.token_context is not None:
            width, back = self.token_context
            n = len(lay.ids)
            self.model.begin_step(input_ids, torch.tensor(lay.history, dtype=torch.long).view(n, width),
                                  torch.tensor(lay.taps, dtype=torch.long).view(n, len(back)) if back else None)
        self.backend.prepare(meta, self.num_ids)
        pos = torch.tensor(lay.positions, dtype=torch.long, device=dev)
        return input_ids, pos, meta

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
        lay = self._layout(out)
        if self.graphs is not None and self.graphs.accepts(lay, self):
            return self.graphs.run(lay), lay.sample_reqs
        input_ids, positions, meta = self._prepare(lay)
        if self.kv.spill is not None:
            self.kv.spill.begin_step()
        hidden = self.model(input_ids, positions, AttentionContext(meta, self.kv, self.backend, self.selector))
        if not lay.sample_rows:
            return None, []
        return self.model.compute_logits(hidden[lay.sample_rows]), lay.sample_reqs
