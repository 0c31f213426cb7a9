"""KV tiers end to end on the default model: the same greedy tokens whether a prefix came from the device,
host memory, disk, Redis or recompute; a restarted engine hits the disk tier; corrupt, truncated and
foreign entries are misses with correct output; a Redis server killed mid-run leaves the engine serving;
offload preemption, async loads, load timeouts, the cost model and pinned prefixes."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tierlm import LLM, SamplingParams
from tierlm.config import TierConfig
from tierlm.kvcache.hashing import hash_request_blocks
from tierlm.kvcache.tiers import EntryIdentity
from tierlm.kvcache.tiers.codec import decode_entry, encode_entry
from tierlm.kvcache.tiers.host import HostTier

TEXT = (Path(__file__).parents[2] / "src/tierlm/bench/data/midsummer_act1.txt").read_text()
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BLOCKS = 28  # 448 tokens of device pool; PROMPT fills 13 blocks


def passage(i: int, n_words: int = 120) -> str:
    words = TEXT.split()
    return " ".join(words[i * n_words:(i + 1) * n_words])


PROMPT = passage(0)
FILLERS = [passage(1), passage(2), passage(3)]  # run one by one, they evict all of PROMPT's blocks


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(default_llm):
    return tokens(default_llm.generate([PROMPT, *FILLERS], PARAMS))


def tiered(tiers: TierConfig, blocks: int = BLOCKS, **kw) -> LLM:
    return LLM(num_kv_blocks=blocks, tiers=tiers, **kw)


def evict_and_rerun(llm: LLM, reference) -> dict[str, int]:
    """PROMPT, fillers that evict it from the device, PROMPT again: checks tokens, returns the second
    PROMPT's cached tokens by tier."""
    assert tokens(llm.generate([PROMPT], PARAMS)) == reference[:1]
    for i, filler in enumerate(FILLERS):
        assert tokens(llm.generate([filler], PARAMS)) == reference[1 + i:2 + i]
    if llm.engine.tiers is not None:
        llm.engine.tiers.flush()
    out = llm.generate([PROMPT], PARAMS)[0]
    assert out.outputs[0].token_ids == reference[0], "a prefix from a lower tier changed the greedy tokens"
    llm.engine.kv.check_integrity()
    return out.cached_tokens_by_tier


def test_recompute_baseline_has_no_lower_hits(reference):
    by_tier = evict_and_rerun(LLM(num_kv_blocks=BLOCKS), reference)
    assert by_tier == {"device": 0}


@pytest.mark.parametrize("which", ["host", "disk", "redis"])
def test_same_tokens_from_every_tier(which, reference, tmp_path, request):
    if which == "host":
        cfg = TierConfig(host_memory_bytes=256 << 20)
    elif which == "disk":
        cfg = TierConfig(disk_dir=str(tmp_path / "kv"))
    else:
        cfg = TierConfig(redis_url=request.getfixturevalue("redis_server").url)
    llm = tiered(cfg)
    by_tier = evict_and_rerun(llm, reference)
    full = (len(llm.tokenizer.encode(PROMPT)) - 1) // 16 * 16
    assert by_tier.get(which, 0) > 0 and sum(by_tier.values()) == full, by_tier
    stats = llm.engine.tier_stats()[which]
    assert stats["hit_tokens"] == by_tier[which] and stats["corrupt"] == 0 and stats["healthy"]
    llm.engine.close()


def test_restarted_engine_hits_the_disk_tier(reference, tmp_path):
    cfg = TierConfig(disk_dir=str(tmp_path / "kv"), write_policy="write_through")
    first = tiered(cfg)
    assert tokens(first.generate([PROMPT], PARAMS)) == reference[:1]
    first.engine.close()  # queued writes land
    del first
    second = tiered(cfg, blocks=BLOCKS + 20)  # restarted with another pool size: the entries still fit
    out = second.generate([PROMPT], PARAMS)[0]
    assert out.outputs[0].token_ids == reference[0]
    assert out.cached_tokens_by_tier["disk"] == (len(out.prompt_token_ids) - 1) // 16 * 16
    second.engine.close()


def test_corrupt_truncated_and_foreign_disk_entries_are_misses(reference, tmp_path):
    """Write the prompt's blocks to disk, then damage entries three ways: a flipped byte, a truncated
    file, and a well-formed entry of another KV format under the right key. Each is detected, counted,
    deleted, and the tokens stay right."""
    cfg = TierConfig(disk_dir=str(tmp_path / "kv"), write_policy="write_through")
    first = tiered(cfg)
    first.generate([PROMPT], PARAMS)
    first.engine.close()
    identity = first.engine.tiers.identity
    files = sorted((tmp_path / "kv").glob("*/*.kv"))
    assert len(files) >= 12
    # Damage blocks 3 (flip), 6 (truncate), 9 (foreign format): block order = the prompt's hash order.
    kv = first.engine.kv
    ids = first.tokenizer.encode(PROMPT)
    req_hashes = hash_request_blocks(ids, 16, 0, kv.extra_keys)
    path = {h: tmp_path / "kv" / h.hex()[:2] / f"{h.hex()}.kv" for h in req_hashes}
    flip = bytearray(path[req_hashes[3]].read_bytes())
    flip[len(flip) // 2] ^= 0x01
    path[req_hashes[3]].write_bytes(bytes(flip))
    whole = path[req_hashes[6]].read_bytes()
    path[req_hashes[6]].write_bytes(whole[: len(whole) - 100])
    good = path[req_hashes[9]].read_bytes()
    tokens9 = ids[9 * 16:10 * 16]
    payload = decode_entry(good, identity, tokens9)
    foreign = EntryIdentity(identity.model, "bf16", identity.layout)
    path[req_hashes[9]].write_bytes(encode_entry(foreign, tokens9, [payload]))
    del first

    for expect_from in (3, 6, 9):
        llm = tiered(cfg)
        out = llm.generate([PROMPT], PARAMS)[0]
        assert out.outputs[0].token_ids == reference[0]
        assert out.cached_tokens_by_tier["disk"] == expect_from * 16  # the run stops at the damaged block
        stats = llm.engine.tier_stats()["disk"]
        assert stats["corrupt"] == 1 and llm.engine.tiers.stats.fallback_corrupt > 0
        llm.engine.close()
        # deleted, recomputed and (write-through) stored again as a good entry; the next damage is next
        mended = path[req_hashes[expect_from]].read_bytes()
        decode_entry(mended, identity, ids[expect_from * 16:(expect_from + 1) * 16])
        llm.engine.kv.check_integrity()


def test_redis_server_killed_mid_run_keeps_serving(reference, redis_server):
    cfg = TierConfig(redis_url=redis_server.url, redis_timeout_s=0.2)
    llm = tiered(cfg)
    tier = llm.engine.tiers.tiers[0]
    tier.BACKOFF_START_S = 0.05
    assert evict_and_rerun(llm, reference)["redis"] > 0
    redis_server.stop()
    for prompt, ref in zip([PROMPT, *FILLERS], reference):  # lookups fail: recompute
        assert tokens(llm.generate([prompt], PARAMS)) == [ref]
    llm.engine.tiers.flush()
    assert tier.stats.errors > 0
    redis_server.start()  # empty again, same port
    time.sleep(0.3)
    by_tier = evict_and_rerun(llm, reference)
    assert tier.healthy and tier.stats.reconnects >= 1
    assert by_tier.get("redis", 0) > 0  # written again after the restart, and hit
    llm.engine.close()


def test_offload_preemption_gives_the_same_tokens(default_llm):
    """A pool too small for four long generations at once: preempted sequences park their KV in host
    memory and resume from it, with exactly the tokens of an unconstrained run."""
    prompts = [passage(10 + i, 60) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = tokens(default_llm.generate(prompts, params))
    llm = tiered(TierConfig(host_memory_bytes=256 << 20, preemption_mode="offload"), blocks=24)
    assert tokens(llm.generate(prompts, params)) == ref
    sched = llm.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_offloads > 0
    assert llm.engine.tiers.stats.hit_tokens.get("host", 0) > 0
    assert not llm.engine.tiers._offloaded  # every pin released
    llm.engine.kv.check_integrity()
    llm.engine.close()


def test_large_load_runs_while_others_decode(reference):
    """A load larger than the step's byte budget leaves its request LOADING; a decoding request keeps
    getting tokens meanwhile; both finish with the reference tokens."""
    llm = tiered(TierConfig(host_memory_bytes=256 << 20, load_step_budget_bytes=0))
    evict_and_rerun(llm, reference)
    eng = llm.engine
    eng.generate = None
    for f in FILLERS:  # push PROMPT out of the device again
        llm.generate([f], PARAMS)
    long_params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    decoding = eng.add_request(FILLERS[0], long_params)
    for _ in range(3):
        eng.step()
    loading = eng.add_request(PROMPT, PARAMS)
    saw_loading_with_decode = False
    done = {}
    for _ in range(500):
        outs = eng.step()
        if eng.scheduler.loading and any(o.request_id == decoding for o in outs):
            saw_loading_with_decode = True
        for o in outs:
            if o.finished:
                done[o.request_id] = o
        if len(done) == 2:
            break
    assert done[loading].outputs[0].token_ids == reference[0]
    assert done[loading].cached_tokens_by_tier.get("host", 0) > 0
    assert saw_loading_with_decode or eng.tiers.stats.load_jobs > 0
    eng.close()


class SlowHost(HostTier):
    """Host memory behind a slow link: every read takes `delay` seconds (a stand-in for a stalled tier)."""

    delay = 1.0

    def _read_many(self, keys):
        time.sleep(self.delay)
        return super()._read_many(keys)


def test_a_load_past_its_timeout_recomputes(reference):
    llm = tiered(TierConfig(host_memory_bytes=256 << 20, load_timeout_s=0.1))
    ctl = llm.engine.tiers
    slow = SlowHost(256 << 20)
    ctl.tiers[0] = slow
    by_tier = evict_and_rerun(llm, reference)
    assert by_tier.get("host", 0) == 0
    assert ctl.stats.fallback_timeout > 0
    llm.engine.close()


def test_cost_model_recomputes_when_loading_is_slower(reference):
    llm = tiered(TierConfig(host_memory_bytes=256 << 20))
    ctl = llm.engine.tiers
    ctl.note_prefill = lambda tokens, seconds: None  # hold the speeds fixed below
    ctl._prefill_tok_s = 1e12  # "recompute is instant"
    by_tier = evict_and_rerun(llm, reference)
    assert by_tier.get("host", 0) == 0 and ctl.stats.fallback_cost > 0
    ctl._prefill_tok_s = 1.0  # "recompute is very slow"
    for f in FILLERS:
        llm.generate([f], PARAMS)
    assert llm.generate([PROMPT], PARAMS)[0].cached_tokens_by_tier.get("host", 0) > 0
    llm.engine.close()


def test_pinned_prefix_survives_device_pressure(reference):
    llm = tiered(TierConfig(pinned_prefixes=(PROMPT,)))
    by_tier = evict_and_rerun(llm, reference)
    assert by_tier["device"] == (len(llm.tokenizer.encode(PROMPT)) - 1) // 16 * 16
    llm.engine.kv.unpin_all()
    llm.engine.kv.check_integrity()


def test_disk_admission_after_hits(tmp_path, reference):
    """admit_after_hits=2: a block evicted from host after one hit never reaches disk; blocks hit twice do."""
    cfg = TierConfig(host_memory_bytes=1, disk_dir=str(tmp_path / "kv"), admit_after_hits=2)
    llm = tiered(cfg)  # a host tier too small for one entry: every demotion falls through to disk
    llm.generate([PROMPT], PARAMS)
    for f in FILLERS:
        llm.generate([f], PARAMS)
    llm.engine.tiers.flush()
    assert llm.engine.tier_stats()["disk"]["entries"] == 0  # nothing was hit twice
    llm.engine.close()


def test_a_corrupt_disk_entry_is_read_from_redis_instead(reference, tmp_path, redis_server):
    """Disk and Redis both hold the prompt (write-through); a damaged disk entry is replaced by Redis's copy
    for that block and the rest of the run, so nothing is recomputed."""
    cfg = TierConfig(disk_dir=str(tmp_path / "kv"), redis_url=redis_server.url, write_policy="write_through")
    first = tiered(cfg)
    first.generate([PROMPT], PARAMS)
    first.close()
    ids = first.tokenizer.encode(PROMPT)
    keys = hash_request_blocks(ids, 16, 0, first.engine.kv.extra_keys)
    path = tmp_path / "kv" / keys[4].hex()[:2] / f"{keys[4].hex()}.kv"
    path.write_bytes(path.read_bytes()[:100])
    del first
    llm = tiered(cfg)
    out = llm.generate([PROMPT], PARAMS)[0]
    assert out.outputs[0].token_ids == reference[0]
    full = (len(ids) - 1) // 16 * 16
    assert out.cached_tokens_by_tier["disk"] == 4 * 16 and out.cached_tokens_by_tier["redis"] == full - 4 * 16
    assert llm.engine.tier_stats()["disk"]["corrupt"] == 1
    llm.close()
