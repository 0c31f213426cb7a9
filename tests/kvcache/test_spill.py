"""Spilled blocks (kvcache/spill.py): a running sequence's cold blocks below the device pool, in host memory or
a mapped file. Spilled blocks read back (gathered, or loaded into a layer's staging blocks) equal the device
ones, FP8 scales and selector metadata included; staging loads only what a layer has not staged, evicts the
least recently picked, and forgets freed slots; the KV manager spills the coldest eligible blocks, never the
sink, the window, a shared block or this step's; and a decode over a staged or gathered table equals one over
the device blocks on both backends."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierlm.attention import AttentionMetadata, select_backend
from tierlm.attention.metadata import kv_index
from tierlm.attention.sparse import add_quest_meta
from tierlm.config import ModelConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.core.request import Request
from tierlm.core.sampling_params import SamplingParams
from tierlm.kvcache import KVCacheManager, KVSpec, KVStorage
from tierlm.kvcache.manager import SpilledBlock
from tierlm.kvcache.spill import SpillStore, plan_spill

CPU = torch.device("cpu")
BS = 4
FORMATS = ["fp32", "fp8_e4m3", "fp8_e5m2_g64_ue8m0", "fp8_e4m3_static"]


def filled(kv_format="fp32", nb=16, num_spill=12, layers=2, hkv=2, d=64, staging=4, directory=None, seed=0):
    """A storage of `nb` device blocks (the last `staging` of them staging) full of random KV and key bounds,
    with a spill store of `num_spill` slots."""
    cfg = ModelConfig("llama", 32, hkv * 2 * d, 64, layers, hkv * 2, hkv, d, 4096)
    s = KVStorage(KVSpec.from_model(cfg, kv_format, BS), nb, CPU, num_spill)
    add_quest_meta(s)
    for layer in s.layers:
        if layer.static_scales is not None:  # a static format's calibrated scales
            layer.static_scales = torch.tensor([[0.01] * hkv, [0.02] * hkv])
    g = torch.Generator().manual_seed(seed)
    slots = torch.arange(nb * BS)
    for layer in s.layers:
        layer.write_slots(slots, torch.randn(nb * BS, hkv, d, generator=g), torch.randn(nb * BS, hkv, d, generator=g))
        for t in layer.block_meta.values():
            t.copy_(torch.randn(t.shape, generator=g))
    return s, SpillStore(s, num_spill, nb - staging, directory)


def read(layer, ids):
    """[2, n, bs, Hkv, D] fp32 K/V of blocks `ids` through LayerKV.read_blocks."""
    t = torch.tensor(ids)
    return layer.read_blocks(kv_index(t, layer.num_ids)).view(2, len(ids), *layer.data.shape[2:])


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("backing", ["host", "file"])
def test_spilled_blocks_read_back_equal_the_device_ones(kv_format, backing, tmp_path):
    s, sp = filled(kv_format, directory=tmp_path if backing == "file" else None)
    blocks = [5, 1, 7]
    before = [read(layer, blocks) for layer in s.layers]
    meta = [{k: t[blocks].clone() for k, t in layer.block_meta.items()} for layer in s.layers]
    ids = sp.spill(blocks)
    assert ids == [16, 17, 18] and sp.num_free == 9
    for layer in s.layers:  # the device blocks are overwritten: what reads back must come from the store
        layer.data.view(torch.uint8).fill_(0)
    for layer, b, m in zip(s.layers, before, meta):
        assert torch.equal(read(layer, ids), b)
        for k, t in layer.block_meta.items():
            assert torch.equal(t[ids], m[k])  # the selector's metadata stays on the device, by spill id
        mixed = read(layer, [0, ids[1], 2])  # device and spilled blocks in one gather
        assert torch.equal(mixed[:, 1], b[:, 1]) and torch.equal(mixed[:, 0], read(layer, [0])[:, 0])
    if backing == "file":
        path = sp.path
        assert path.parent == tmp_path and path.stat().st_size == sp.nbytes
        sp.close()
        assert not path.exists() and s[0].spill is None
    else:
        assert sp.path is None and sp.stats()["backing"] == "host"


@pytest.mark.parametrize("kv_format", FORMATS)
def test_staging_loads_the_picks_once_and_maps_tables_to_device_blocks(kv_format):
    s, sp = filled(kv_format, staging=4)
    blocks = [2, 3, 4, 5, 6]
    want = [read(layer, blocks) for layer in s.layers]
    ids = sp.spill(blocks)  # 16..20
    tables = torch.tensor([[0, ids[0], ids[2], 9], [1, ids[2], 8, 8]])
    out = sp.stage(1, tables, picked=True)
    assert out is not tables and int(out.max()) < s.num_blocks
    assert torch.equal(out[:, [0, 3]], tables[:, [0, 3]]) and torch.equal(out[1, 2:], tables[1, 2:])  # device ids kept
    assert set(out[:, 1:3].reshape(-1).tolist()) - {8, 9} <= set(sp.staging)
    assert torch.equal(read(s[1], out[0].tolist())[:, 1:3], want[1][:, [0, 2]])
    assert sp.counters["loads"] == 2 and sp.counters["hits"] == 0
    assert sp.stage(0, torch.tensor([[0, 9]]), picked=False).tolist() == [[0, 9]]  # no spill id: as is
    # the same picks next step: hits, nothing loaded; layer 0 stages on its own
    sp.stage(1, tables, picked=True)
    assert sp.counters["loads"] == 2 and sp.counters["hits"] == 2
    sp.stage(0, tables, picked=True)
    assert sp.counters["loads"] == 4
    # four staging blocks per layer: three new picks evict the least recently picked one (ids[0]), not ids[2]
    for picks in ([ids[2], ids[1]], [ids[3], ids[4]]):
        sp.begin_step()
        sp.stage(1, torch.tensor([picks]), picked=True)
    assert list(sp._staged[1]) == [ids[2], ids[1], ids[3], ids[4]]
    sp.begin_step()
    sp.stage(1, torch.tensor([[ids[0], ids[3]]]), picked=True)
    assert ids[2] not in sp._staged[1] and ids[1] in sp._staged[1]
    staged = sp.stage(1, torch.tensor([[ids[0], ids[1], ids[3], ids[4]]]), picked=True)
    assert torch.equal(read(s[1], staged[0].tolist()), want[1][:, [0, 1, 3, 4]])
    # more spilled picks than staging blocks: left as is, for the backend to gather
    wide = torch.tensor([ids])
    assert sp.stage(1, wide, picked=False) is wide and sp.counters["gathers"] == 1
    assert sp.last_pick[ids[2]] < sp.last_pick[ids[0]] == sp.clock


def test_a_freed_slot_is_never_read_from_a_stale_staging_block():
    s, sp = filled(staging=2)
    first = sp.spill([3])
    sp.stage(0, torch.tensor([first]), picked=True)
    sp.free(first)
    second = sp.spill([6])  # the same slot, other KV
    assert second == first
    staged = sp.stage(0, torch.tensor([second]), picked=True)
    assert torch.equal(read(s[0], staged[0].tolist()), read(s[0], second)) and sp.counters["loads"] == 2


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kv_format", ["fp32", "fp8_e4m3", "fp8_e5m2_g64_ue8m0", "fp8_e4m3_static"])
def test_decodes_over_spilled_tables_equal_decodes_over_device_blocks(backend, kv_format):
    be = select_backend(backend, CPU, torch.float32, kv_format)
    s, sp = filled(kv_format, nb=24, staging=4, hkv=2, d=64)
    layer = s[0]
    tables = torch.tensor([[0, 2, 3, 5, 6, 7], [1, 4, 9, 10, 11, 12]])
    lens = torch.tensor([22, 23])
    q = torch.randn(2, 4, 64)

    def decode(t):
        meta = AttentionMetadata(BS, torch.zeros(0, dtype=torch.long), 2, t, lens)
        be.prepare(meta, s.num_ids)
        return be.attend(q, None, None, layer, meta, 0.125)

    want = decode(tables)
    ids = sp.spill([2, 3, 9, 10])
    spilled = torch.tensor([[0, ids[0], ids[1], 5, 6, 7], [1, 4, ids[2], ids[3], 11, 12]])
    # torch: gathered from the store; cpu: the native kernel reads the store's rows in place
    assert torch.equal(decode(spilled), want)
    assert torch.equal(decode(sp.stage(0, spilled, picked=True)), want)  # staged on the device


# ---- the KV manager ------------------------------------------------------------------------------------
def manager(pool=8, num_spill=16, staging=2, keep=(1, 1), prefix=False):
    s, sp = filled(nb=pool + staging, num_spill=num_spill, staging=staging)
    return KVCacheManager(pool, BS, prefix, spill=sp, spill_keep=keep), sp


def req(rid, n, first=100):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=64))


def advance(kv, r, n):
    table = kv.allocate_slots(r, n)
    if table is not None:
        r.num_computed_tokens += n
    return table


def test_the_manager_spills_the_least_recently_picked_blocks_outside_sink_and_window():
    kv, sp = manager(pool=8, keep=(1, 1))
    a = req("a", 64)
    assert advance(kv, a, 28) is not None  # 7 blocks of 8
    table = kv.get_block_table("a")
    sp.begin_step()
    sp.last_pick[[table[1], table[3], table[4]]] = sp.clock  # picked just now: keep them longest
    assert kv.room(a) == (1 + 5) * BS  # one free block, five spillable ones (1..5: sink 0, window 6)
    assert advance(kv, a, 12) is not None  # needs 3 blocks: one free, two spilled
    now = kv.get_block_table("a")
    assert now[2] >= sp.first_id and now[5] >= sp.first_id  # the two never picked, in position order
    assert [now[i] for i in (0, 1, 3, 4, 6)] == [table[i] for i in (0, 1, 3, 4, 6)]
    assert sp.counters["spilled"] == 2 and len(now) == 10 and kv.num_free_blocks == 0
    kv.check_integrity()
    kv.free(a)
    assert sp.num_free == 16 and kv.num_free_blocks == 8
    kv.check_integrity()


def test_shared_and_uncomputed_blocks_are_never_spilled():
    kv, sp = manager(pool=9, keep=(0, 0), prefix=True)
    a, b = req("a", 40), req("b", 40)  # the same tokens: b shares a's full blocks
    assert advance(kv, a, 20) is not None
    hits, n = kv.get_computed_blocks(b)
    assert len(hits) == 5 and kv.allocate_slots(b, 4, hits) is not None
    b.num_computed_tokens = n + 4
    kv.commit_step()
    c = req("c", 40, first=900)
    assert kv.allocate_slots(c, 8) is not None  # allocated this step, not computed yet
    # a's five blocks are shared with b and c's two are not written: only b's own sixth block may go
    assert kv.num_free_blocks == 1 and kv.room(a) == (1 + 1) * BS
    assert kv.allocate_slots(a, 12) is None and sp.counters["spilled"] == 0  # 3 blocks do not fit
    assert kv.allocate_slots(a, 8) is not None and sp.counters["spilled"] == 1
    assert kv.get_block_table("b")[5] >= sp.first_id
    kv.check_integrity()


def test_a_context_beyond_the_pool_is_allocated_by_spilling_and_stops_when_the_store_is_full():
    kv, sp = manager(pool=6, num_spill=4, keep=(1, 1))
    a = req("a", 64)
    got = 0
    while True:
        n = min(8, kv.room(a))
        if n == 0 or advance(kv, a, n) is None:
            break
        got += n
    assert got == (6 + 4) * BS  # the pool plus the spill slots
    table = kv.get_block_table("a")
    assert sum(i >= sp.first_id for i in table) == 4 and sp.num_free == 0
    assert isinstance(kv._tables["a"][1], SpilledBlock)
    kv.check_integrity()


def test_bad_spill_sizes_name_the_fix():
    with pytest.raises(InvalidParameterError, match="sparse-staging"):
        plan_spill(1000, num_blocks=10, block_size=16, spill_bytes=10**6, staging_tokens=150, keep_blocks=2)
    with pytest.raises(InvalidParameterError, match="at least 1000 bytes"):
        plan_spill(1000, num_blocks=10, block_size=16, spill_bytes=999, staging_tokens=16, keep_blocks=2)
    assert plan_spill(1000, num_blocks=10, block_size=16, spill_bytes=5500, staging_tokens=20, keep_blocks=2) == (8, 5)
    from tierlm.config import SparseConfig

    with pytest.raises(InvalidParameterError, match="--sparse quest"):
        SparseConfig(spill_bytes=1 << 20)
    with pytest.raises(InvalidParameterError, match="--sparse-spill SIZE"):
        SparseConfig(selector="quest", spill_dir="/tmp/x")


def test_a_spill_file_the_disk_cannot_hold_fails_at_start_and_leaves_nothing(tmp_path):
    """The file is reserved whole when the store opens, so a disk without room fails there with one line naming
    the fix (not with SIGBUS at the first spill past the free space). A real limit: a child process whose file
    size limit (RLIMIT_FSIZE, 64 KiB) is below the store's size."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_spill import filled
        from tierlm.core.errors import InvalidParameterError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        try:
            filled(directory={str(tmp_path)!r})
        except InvalidParameterError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "cannot reserve" in out.stdout and "--sparse-spill-dir" in out.stdout, out.stdout
    assert list(tmp_path.iterdir()) == []  # the partial file is removed
    filled(directory=tmp_path)  # without the limit the same store opens


# ---- the scheduler over a spilling manager --------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=st.integers(4, 10), budget=st.integers(2, 24), prefix=st.booleans(), max_seqs=st.integers(1, 4),
       reqs=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 12)), min_size=1, max_size=5))
def test_long_contexts_run_to_the_end_and_every_step_reads_the_kv_its_tokens_wrote(pool, budget, prefix, max_seqs,
                                                                                   reqs):
    """The engine's loop with the model replaced by "write a code per (request, position) into K, then check
    every scheduled table reads back its context's codes": contexts beyond the pool spill, tables are current
    even when a later allocation in the same step spilled an earlier request's blocks, and everything ends."""
    from tierlm.config import SchedulerConfig
    from tierlm.core.request import RequestStatus
    from tierlm.scheduler import Scheduler

    s, sp = filled(nb=pool + 2, num_spill=64, staging=2, layers=1, hkv=1, d=2)
    layer = s[0]
    kv = KVCacheManager(pool, BS, prefix, spill=sp, spill_keep=(1, 1))
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv)
    requests = [Request(f"r{i}", [i % 3] * n, SamplingParams(max_tokens=m), arrival_time=float(i))
                for i, (n, m) in enumerate(reqs)]
    for r in requests:
        sched.add(r)
    code = {r.request_id: 1000 * (i % 3) for i, r in enumerate(requests)}  # same prompt, same KV (prefix hits)
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.is_empty
        for sr in out.scheduled:
            r, start, n = sr.request, sr.request.num_computed_tokens, sr.num_new_tokens
            table = torch.tensor(sr.block_table)
            pos = torch.arange(start + n)
            assert int(table[pos[start:] // BS].max()) < pool  # new tokens go to device blocks
            vals = (code[r.request_id] + pos[start:] + 1).float().view(-1, 1, 1).expand(-1, 1, 2)
            layer.write_slots(table[pos[start:] // BS] * BS + pos[start:] % BS, vals, vals)
        for sr in out.scheduled:  # after every write of the step, as attention reads
            r, start, n = sr.request, sr.request.num_computed_tokens, sr.num_new_tokens
            nblk = -(-(start + n) // BS)
            got = read(layer, sr.block_table[:nblk])[0].reshape(-1, 2)[: start + n, 0]
            assert got.tolist() == (code[r.request_id] + torch.arange(start + n) + 1).float().tolist()
        sched.update_after_step(out)
        for sr in out.scheduled:
            r = sr.request
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(r.num_tokens)
                if len(r.output_token_ids) >= r.sampling_params.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
        kv.check_integrity()
        steps += 1
        assert steps < 5000
    assert kv.num_free_blocks == pool and sp.num_free == 64
