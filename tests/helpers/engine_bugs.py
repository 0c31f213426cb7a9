"""Deliberate engine bugs, patched in for a test, that the correctness gate must catch."""
from __future__ import annotations

from tierlm.kvcache.manager import KVCacheManager
from tierlm.scheduler.scheduler import Scheduler


def chunk_boundary_off_by_one(monkeypatch):
    """A prefill chunk that stops mid-prompt advances one token too far: the next chunk starts late and the
    skipped token's KV is never written."""
    real = Scheduler.update_after_step

    def broken(self, out):
        real(self, out)
        for s in out.scheduled:
            r = s.request
            if not s.is_decode and r.num_computed_tokens < r.num_prompt_tokens - 1:
                r.num_computed_tokens += 1

    monkeypatch.setattr(Scheduler, "update_after_step", broken)


def prefix_hit_one_token_long(monkeypatch):
    """A prefix hit claims one token more than its blocks hold: that token's KV is never computed."""
    real = KVCacheManager.get_computed_blocks

    def broken(self, request):
        hits, n = real(self, request)
        return hits, (n + 1 if hits and n + 1 < request.num_tokens else n)

    monkeypatch.setattr(KVCacheManager, "get_computed_blocks", broken)


def tier_load_into_next_block(monkeypatch):
    """A KV tier load writes each verified entry into the NEXT block of the load (off by one): the load's first
    block keeps whatever KV it held before and the last entry is dropped, so a prefix loaded back from host,
    disk or Redis attends to the wrong KV."""
    from tierlm.kvcache.tiers.controller import TierController

    real = TierController._scatter

    def broken(self, block_ids, payloads):
        ids = list(block_ids)
        if len(ids) > 1:
            real(self, ids[1:], list(payloads)[:-1])

    monkeypatch.setattr(TierController, "_scatter", broken)


def fp8_scale_one_exponent_off(monkeypatch):
    """The FP8 KV write path stores every scale one power of two too large (a UE8M0 exponent off by one):
    every K/V value reads back twice what was written, on every attention path."""
    import tierlm.kvcache.storage as storage

    real = storage.quantize_kv

    def broken(kv, scheme, static_scales=None):
        data, scales = real(kv, scheme, static_scales)
        return data, (None if scales is None else scales * 2)

    monkeypatch.setattr(storage, "quantize_kv", broken)


def broken_static_kv_scales(engine, path):
    """A calibration file for `engine`'s model (static FP8 KV) whose scales are 1000x too small: almost every
    K/V value saturates at +-448 (|K| ~ 10, |V| ~ 2 on the default model). Returns the saved path."""
    import torch

    from tierlm.quant.calibration import KVScales, ModelIdentity

    cfg = engine.model_config
    identity = ModelIdentity(cfg.model_id, engine.weights_digest, engine.model_config_digest)
    typical = torch.tensor([10.0, 2.0]).view(1, 2, 1).expand(cfg.num_layers, 2, cfg.num_kv_heads)
    return KVScales(identity, (typical * 1e-3).contiguous(), tokens=1).save(path)


def _mass_select(invert: bool):
    """A selector `select` that ranks the blocks between sink and window by their true attention mass (softmax
    of q.k over the whole context per query head, summed per block, max over heads; fp32 KV only): the oracle
    a block selector approximates, or with `invert` its worst choice (the blocks that matter least)."""
    import torch

    from tierlm.attention.sparse import Picks

    def select(self, q, layer, tables, lens, scale, static=False):  # static: host work is fine here (never captured)
        bs, kb = self.block_size, self.budget_blocks
        nblocks = (lens + bs - 1) // bs
        if int(nblocks.max()) <= kb:
            return Picks(tables, lens)
        rows, out_lens = [], []
        for i in range(tables.shape[0]):
            nb, length = int(nblocks[i]), int(lens[i])
            t = tables[i, :nb]
            k = layer.data[0][t]  # [nb, bs, Hkv, D]
            hkv, d = k.shape[2], k.shape[3]
            keys = k.reshape(nb * bs, hkv, d)[:length].float()
            qi = q[i].float().view(hkv, -1, d)
            p = (torch.einsum("hgd,thd->hgt", qi, keys) * scale).softmax(-1).reshape(-1, length)
            mass = torch.zeros(p.shape[0], nb * bs)
            mass[:, :length] = p
            score = mass.view(-1, nb, bs).sum(-1).amax(0)
            keep = torch.zeros(nb, dtype=torch.bool)
            keep[: self.sink_blocks] = True
            keep[nb - self.window_blocks:] = True
            score = torch.where(keep, torch.tensor(float("-inf")), -score if invert else score)
            keep[score.topk(max(0, min(kb - int(keep.sum()), int((~keep).sum())))).indices] = True
            idx = keep.nonzero().flatten()
            rows.append(t[idx])
            out_lens.append((len(idx) - 1) * bs + length - (nb - 1) * bs)
        width = max(len(r) for r in rows)
        return Picks(torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows]),
                     torch.tensor(out_lens))

    return select


def sparse_oracle_selector(monkeypatch):
    """Not a bug: the Quest selector replaced by the attention-mass oracle (fp32 KV), a selector that picks well."""
    from tierlm.attention.sparse import QuestSelector

    monkeypatch.setattr(QuestSelector, "select", _mass_select(invert=False))


def sparse_selector_picks_worst(monkeypatch):
    """A sign bug in block ranking: the selector keeps the sink and the window but, between them, the blocks with
    the least attention mass instead of the most."""
    from tierlm.attention.sparse import QuestSelector

    monkeypatch.setattr(QuestSelector, "select", _mass_select(invert=True))


def quant_nibbles_swapped(monkeypatch):
    """GGUF Q4 blocks packed with their two nibble halves swapped (element j read from the high nibble of byte j
    instead of the low one): every 4-bit weight sits 16 places away from where it belongs, on every path that
    runs the stored blocks (a fresh quantized-weights cache is built with the bug)."""
    import tierlm.models.loader.quantized as quantized

    real = quantized.from_gguf_blocks

    def broken(kind, raw, n, k):
        pw = real(kind, raw, n, k)
        if pw.bits != 4:
            return pw
        from tierlm.quant.weights import codes_of, pack, row_params

        codes = codes_of(pw).view(n, k // 32, 2, 16).flip(2).reshape(n, k)
        return pack(pw.fmt, codes, *row_params(pw), 4)

    monkeypatch.setattr(quantized, "from_gguf_blocks", broken)


def fp8_scales_inverted(monkeypatch):
    """An FP8 checkpoint's weight_scale_inv taken for the quantizer's scale (divided by instead of multiplied by,
    the name's trap) on the path that runs the stored blocks: the fp32 dequantization the baseline computes with
    stays right (a fresh quantized-weights cache is built with the bug)."""
    import tierlm.models.loader.quantized as quantized

    real = quantized.pack

    def broken(fmt, codes, scales, mins, bits):
        return real(fmt, codes, 1.0 / scales if fmt == "fp8" else scales, mins, bits)

    monkeypatch.setattr(quantized, "pack", broken)


def engram_host_rows_shifted(monkeypatch):
    """Engram tables in host memory hand back the next row (an off-by-one in the gather's index): the device and
    mmap backends stay right, so only a config serving from host memory computes with the wrong memory."""
    from tierlm.memory.storage import EngramTable

    real = EngramTable.gather

    def broken(self, rows, device="cpu", out=None):
        if self.backend == "host":
            rows = (rows + 1) % self.rows
        return real(self, rows, device, out)

    monkeypatch.setattr(EngramTable, "gather", broken)


def engram_mmap_ahead_stale(monkeypatch):
    """Rows handed over ahead from a memory-mapped table are another token's (a staging buffer reused too early):
    the configs that prefetch at step layout or not at all, and the device-resident reference, stay right."""
    from tierlm.models.v4mini import V4MiniForCausalLM

    real = V4MiniForCausalLM.prefetch_ahead

    def broken(self, ids, history):
        real(self, ids, history)
        if self._ahead is not None and self.tables[self.engram_layers[0]].backend == "mmap":
            self._ahead.tickets = self._submit((ids + 1) % self.config.vocab_size, history)

    monkeypatch.setattr(V4MiniForCausalLM, "prefetch_ahead", broken)
