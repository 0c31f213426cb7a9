"""Random admissions, chunked prefills, decodes, frees, preemption offloads and disk damage against a
KVCacheManager with real KV storage and two lower tiers (host memory, a disk directory), checking after
every operation:
  * every tier's accounting (capacity never exceeded, index == stored bytes) and the manager's invariants;
  * every block handed out as computed (device hit or lower-tier load) holds exactly its tokens' KV;
  * every entry a tier holds decodes to the KV of the tokens its header names (demotion never stores
    another block's KV), and no entry below host has fewer hits than the admission threshold allows;
  * a damaged disk entry is never loaded.
The "forward pass" writes K = token id + 1000 * layer and V = -K into each slot, so the KV of any block can
be read back as tokens.
"""
from __future__ import annotations

import json
import struct
import tempfile

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tierlm.config import TierConfig
from tierlm.core.request import Request
from tierlm.core.sampling_params import SamplingParams
from tierlm.kvcache.manager import KVCacheManager
from tierlm.kvcache.spec import KVSpec
from tierlm.kvcache.storage import KVStorage
from tierlm.kvcache.tiers import EntryIdentity, TierController
from tierlm.kvcache.tiers.disk import DiskTier
from tierlm.kvcache.tiers.codec import CorruptEntry, decode_entry
from tierlm.kvcache.tiers.host import HostTier

BS = 4
NUM_BLOCKS = 10
LAYERS = 2
SPEC = KVSpec(num_layers=LAYERS, num_kv_heads=1, head_dim=2, kv_format="fp32", block_size=BS)
ID = EntryIdentity("m", "fp32", "test")
BASES = ([1, 2, 3, 4] * 5, [1, 2, 3, 4, 5, 5, 5, 5] * 3, [7] * 20)


def entry_size() -> int:
    """Bytes of one encoded entry (the header's JSON length varies a little with the token digits)."""
    return 28 + 80 + LAYERS * 2 * BS * 2 * 4


class TieredMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.storage = KVStorage(SPEC, NUM_BLOCKS, "cpu")
        self.config = TierConfig(host_memory_bytes=3 * entry_size(), disk_dir=self.dir.name,
                                 disk_bytes=6 * entry_size(), admit_after_hits=0)
        self.host = HostTier(self.config.host_memory_bytes)
        self.disk = DiskTier(self.dir.name, self.config.disk_bytes)
        self.ctl = TierController(self.config, [self.host, self.disk], self.storage, ID)
        self.mgr = KVCacheManager(NUM_BLOCKS, BS, True, hash_seed=3, extra_keys=("m",), tiers=self.ctl)
        self.live: dict[str, Request] = {}
        self.count = 0

    def teardown(self):
        self.ctl.close()
        self.dir.cleanup()

    # ---- the model's side ------------------------------------------------------------------------
    def write(self, req: Request, table: list[int], lo: int, hi: int) -> None:
        for pos in range(lo, hi):
            b, s = table[pos // BS], pos % BS
            for layer in range(LAYERS):
                k = float(req.token_id_at(pos) + 1000 * layer)
                self.storage[layer].data[0, b, s] = k
                self.storage[layer].data[1, b, s] = -k

    def block_tokens(self, block_id: int) -> list[int]:
        out = []
        for s in range(BS):
            k0 = self.storage[0].data[0, block_id, s, 0, 0].item()
            for layer in range(LAYERS):
                assert self.storage[layer].data[0, block_id, s, 0, 1].item() == k0 + 1000 * layer
                assert self.storage[layer].data[1, block_id, s, 0, 0].item() == -(k0 + 1000 * layer)
            out.append(int(k0))
        return out

    def check_prefix(self, req: Request, table: list[int], n_tokens: int, where: str) -> None:
        for i in range(n_tokens // BS):
            assert self.block_tokens(table[i]) == req.all_token_ids[i * BS:(i + 1) * BS], f"{where}: block {i}"

    # ---- rules -------------------------------------------------------------------------------------
    @rule(base=st.sampled_from(BASES), keep=st.integers(0, 20), tail=st.lists(st.integers(0, 7), max_size=6),
          chunk=st.integers(1, 24))
    def add_request(self, base, keep, tail, chunk):
        prompt = base[:keep] + tail or [0]
        self.count += 1
        req = Request(f"r{self.count}", prompt, SamplingParams())
        hits, num_hit = self.mgr.get_computed_blocks(req)
        lower = self.mgr.lower_hit(req)
        if lower is not None:
            event("lower-tier hit")
            job = self.mgr.start_load(req, hits, lower)
            if job is None:
                self.mgr.free(req)
                return
            job.wait(5.0)
            computed = self.mgr.finish_load(req)
            table = self.mgr.get_block_table(req.request_id)
            self.check_prefix(req, table, computed, "loaded prefix")
            req.num_computed_tokens = computed
            num_new = min(chunk, len(prompt) - computed)
            table = self.mgr.allocate_slots(req, num_new)
            if table is None:
                self.mgr.free(req)
                return
            self.write(req, table, computed, computed + num_new)
            req.num_computed_tokens += num_new
        else:
            event("device hit" if hits else "miss")
            table = self.mgr.allocate_slots(req, min(chunk, len(prompt) - num_hit), hits)
            if table is None:
                self.mgr.free(req)
                return
            self.check_prefix(req, table, num_hit, "device hit")
            num_new = min(chunk, len(prompt) - num_hit)
            self.write(req, table, num_hit, num_hit + num_new)
            req.num_computed_tokens = num_hit + num_new
        self.mgr.commit_step()
        self.live[req.request_id] = req

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 24), token=st.integers(0, 7))
    def step(self, data, chunk, token):
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(token)
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        table = self.mgr.allocate_slots(req, num_new)
        if table is None:  # preempted: offload its blocks (host, pinned) or just free them
            self.mgr.offload(req)
            self.mgr.free(req)
            self.mgr.release_offload(req)
            del self.live[req.request_id]
            return
        self.write(req, table, req.num_computed_tokens, req.num_computed_tokens + num_new)
        req.num_computed_tokens += num_new
        self.mgr.commit_step()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        self.mgr.free(self.live.pop(data.draw(st.sampled_from(sorted(self.live)))))

    @rule(data=st.data())
    def damage_a_disk_entry(self, data):
        self.ctl.flush()
        files = sorted(self.disk.directory.glob("*/*.kv"))
        if not files:
            return
        path = data.draw(st.sampled_from(files))
        raw = bytearray(path.read_bytes())
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0x40
        path.write_bytes(bytes(raw))
        event("disk entry damaged")

    # ---- invariants --------------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        self.ctl.flush()
        self.mgr.check_integrity()
        for block in self.mgr.pool.blocks:
            if block.block_hash is not None:
                assert tuple(self.block_tokens(block.block_id)) == block.token_ids
        for tier in (self.host, self.disk):
            for key in list(tier.index.keys()):
                value = tier.load([key])[0]
                if value is None:
                    continue
                header_len = struct.unpack_from("<I", value, 8)[0]
                try:
                    tokens = json.loads(bytes(value[28:header_len]))["tokens"]
                    payload = decode_entry(value, ID, tokens)  # the checks a load makes
                except (ValueError, KeyError, TypeError, UnicodeDecodeError, CorruptEntry):
                    continue  # damaged on purpose: a load refuses it (the hit rules check what loads)
                k_layer0 = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(
                    LAYERS, 2, BS, 1, 2)[0, 0, :, 0, 0].tolist()
                assert [int(x) for x in k_layer0] == tokens, f"{tier.name} holds another block's KV"


TieredMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_tiered_manager_stateful = TieredMachine.TestCase
