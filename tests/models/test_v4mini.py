"""The V4-mini family: a checkpoint written by models/export.py loads through the loader and serves through the
engine; the engine's greedy tokens equal the dense (training) forward pass, with chunked prefill, batching, every
table backend, prefetch on and off, prefix-cache hits and host-tier loads (the Engram conv state travels with the
KV); bad checkpoints are refused with one clear line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.config import TierConfig
from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.config import ENGRAM_STATE
from tierlm.models.dense import dense_forward
from tierlm.models.export import save_checkpoint
from tierlm.models.loader import load_checkpoint
from helpers.v4mini import VOCAB, random_model, tiny_config, write_v4mini

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_v4mini(tmp_path_factory.mktemp("v4mini") / "ck")


def prompts(n: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length + 3 * i,), generator=g).tolist() for i in range(n)]


@torch.no_grad()
def reference(model, prompt: list[int], n: int = GREEDY.max_tokens) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        hidden = dense_forward(model, torch.tensor([seq]))
        seq.append(int(model.compute_logits(hidden[0, -1:]).argmax()))
    return seq[len(prompt):]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("backend", ["device", "host", "mmap"])
def test_engine_greedy_equals_the_training_forward(checkpoint, backend):
    model, path = checkpoint
    batch = prompts(3, 21)
    llm = LLM(str(path), engram_backend=backend, max_num_batched_tokens=16)  # prompts prefill in chunks
    try:
        assert llm.engine.model.tables[0].backend == backend
        assert tokens(llm.generate(batch, GREEDY)) == [reference(model, p) for p in batch]
    finally:
        llm.engine.close()


@pytest.mark.parametrize("mode", ["auto", "ahead", "step", "off"])
def test_every_prefetch_mode_gives_the_same_tokens(checkpoint, mode):
    model, path = checkpoint
    batch = prompts(3, 17, seed=5)
    llm = LLM(str(path), engram_prefetch=mode, max_num_batched_tokens=24)
    try:
        assert tokens(llm.generate(batch, GREEDY)) == [reference(model, p) for p in batch]
        f = llm.engine.model.fetched
        if mode == "ahead":  # every decode token after each request's first was handed over when it was sampled
            assert f["ahead"] >= 3 * (GREEDY.max_tokens - 1) and f["layer"] == 0
        elif mode == "auto":  # on a CPU: steps of up to 2 tokens prefetched, larger ones looked up in the layer
            assert f["layer"] > 0 and f["ahead"] + f["step"] > 0
        else:
            assert f["ahead"] == 0 and f["step" if mode == "step" else "layer"] > 0
        assert sum(f.values()) >= 3 * (17 + 3 + GREEDY.max_tokens - 1)
    finally:
        llm.engine.close()


def test_rows_handed_over_ahead_are_the_ones_used(checkpoint, monkeypatch):
    """The ahead rows are what the step computes with (rows gathered for other ids change the tokens), and a
    hand-off whose tokens are not the step's is ignored (its keys do not match: the step fetches its own)."""
    from tierlm.models.v4mini import V4MiniForCausalLM

    model, path = checkpoint
    batch = prompts(2, 17, seed=6)
    want = [reference(model, p) for p in batch]
    real = V4MiniForCausalLM.prefetch_ahead

    def wrong_rows(self, ids, history):  # keys of the true tokens, rows of the next id
        real(self, ids, history)
        if self._ahead is not None:
            self._ahead.tickets = self._submit((ids + 1) % VOCAB, history)

    def wrong_tokens(self, ids, history):  # a hand-off of tokens the next step does not run
        real(self, (ids + 1) % VOCAB, history)

    for patch, same in ((wrong_rows, False), (wrong_tokens, True)):
        monkeypatch.setattr(V4MiniForCausalLM, "prefetch_ahead", patch)
        llm = LLM(str(path), engram_prefetch="ahead")
        try:
            assert (tokens(llm.generate(batch, GREEDY)) == want) is same
            assert (llm.engine.model.fetched["ahead"] > 0) is not same
        finally:
            llm.engine.close()


def test_prefix_cache_hit_restores_the_conv_state(checkpoint):
    model, path = checkpoint
    base = prompts(1, 40, seed=7)[0]
    longer = base + [5, 6, 7, 8]
    llm = LLM(str(path))
    assert tokens(llm.generate([base], GREEDY)) == [reference(model, base)]
    out = llm.generate([longer], GREEDY)[0]
    assert out.num_cached_tokens >= 32, "the second prompt should hit the first one's full blocks"
    assert out.outputs[0].token_ids == reference(model, longer)
    # The state is read, not recomputed: wiping it makes a hit give other tokens (so the check above can fail).
    for layer in llm.engine.kv_storage.layers:
        if ENGRAM_STATE in layer.block_meta:
            layer.block_meta[ENGRAM_STATE].zero_()
    wiped = llm.generate([longer], GREEDY)[0]
    assert wiped.num_cached_tokens >= 32
    assert wiped.outputs[0].token_ids != reference(model, longer)


def test_host_tier_load_carries_the_conv_state(checkpoint):
    model, path = checkpoint
    first, *fillers = prompts(4, 60, seed=11)
    llm = LLM(str(path), num_kv_blocks=8, tiers=TierConfig(host_memory_bytes=64 << 20))
    try:
        assert tokens(llm.generate([first], GREEDY)) == [reference(model, first)]
        for f in fillers:  # each fills the 8-block pool: the first prompt's blocks go to host memory
            llm.generate([f], GREEDY)
        llm.engine.tiers.flush()
        out = llm.generate([first], GREEDY)[0]
        assert out.cached_tokens_by_tier.get("host", 0) >= 48
        assert out.outputs[0].token_ids == reference(model, first)
    finally:
        llm.engine.close()


def test_state_bytes_are_counted_per_token(checkpoint):
    _, path = checkpoint
    llm = LLM(str(path))
    spec = llm.engine.kv_spec
    assert spec.state_bytes_per_token == 2 * 64 * 4  # two Engram layers, hidden 64, fp32
    assert llm.engine.kv_storage.nbytes == spec.page_size_bytes * llm.engine.kv_storage.num_blocks


def test_without_conv_there_is_no_state(tmp_path):
    cfg = tiny_config(conv=False, layers=(1,))
    model = random_model(cfg, seed=3)
    path = save_checkpoint(model, load_checkpoint(None).tokenizer, tmp_path / "ck")
    llm = LLM(str(path))
    assert llm.engine.kv_spec.state_bytes_per_token == 0
    batch = prompts(2, 19, seed=2)
    assert tokens(llm.generate(batch, GREEDY)) == [reference(model, p) for p in batch]


def test_info_shows_the_engram_tables(checkpoint, tmp_path, capsys):
    from tierlm.cli import main
    from tierlm.memory.hashing import layer_hasher

    model, path = checkpoint
    e = model.config.engram
    assert main(["info", "--model", str(path), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())["engram"]
    rows = sum(layer_hasher(e, i, VOCAB).total_rows for i in e.layers)
    assert info["rows"] == rows and info["table_bytes"] == rows * e.row_dim * 4
    assert info["layers"] == [0, 2] and info["state_bytes_per_token"] == 2 * 64 * 4
    assert info["table_file"] == str(path / "engram.safetensors")
    assert f"{rows:,} rows x {e.row_dim} values" in capsys.readouterr().out


# ---- bad checkpoints ---------------------------------------------------------------------------------------
def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "ck")


def _set_engram(**kw):
    def edit(cfg):
        cfg["engram"].update(kw)
    return edit


def _set_attention(cfg):
    cfg["attention_type"] = "csa"


@pytest.mark.parametrize("edit, error, match", [
    (_set_engram(head=4), CorruptModelError, "unknown engram key"),
    (_set_engram(rows_per_head=1021), CorruptModelError, "the config implies"),  # tables from another config
    (_set_engram(layers=[5]), Exception, "Engram layer 5 does not exist"),
    (_set_attention, UnsupportedModelError, "attention_type 'csa'"),
], ids=["unknown-key", "other-tables", "layer-past-last", "attention-type"])
def test_a_bad_config_is_refused_by_name(checkpoint, tmp_path, edit, error, match):
    ck = _copy(checkpoint[1], tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        LLM(str(ck))


def test_truncated_or_missing_table_file_is_refused(checkpoint, tmp_path):
    ck = _copy(checkpoint[1], tmp_path)
    table = ck / "engram.safetensors"
    table.write_bytes(table.read_bytes()[:-100])
    with pytest.raises(CorruptModelError, match="truncated"):
        load_checkpoint(ck)
    table.unlink()
    with pytest.raises(CorruptModelError, match="missing"):
        load_checkpoint(ck)
