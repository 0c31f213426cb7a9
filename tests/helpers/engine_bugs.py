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
