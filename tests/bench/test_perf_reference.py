"""`python -m tierlm.bench.perf`'s fp32 reference check and rows, on a tiny random model on CPU.

With --dtype bf16 both sides are also diffed against a tierlm engine in fp32 (built after the timed runs);
--no-reference and fp32 runs leave it out; and the reference engine reproduces an fp32 engine's tokens
exactly on the same prompts (the self-check that makes it a reference).
"""
from __future__ import annotations

import json

import pytest
import torch

from tierlm.bench import perf
from helpers.random_model import write_random_model, write_tokenizer
from tierlm.config import ModelConfig

VOCAB = 320
CONFIG = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
ARGS = ["--device", "cpu", "--batch", "1", "2", "--prompt-len", "8", "--prefill-len", "16", "600", "--new-tokens",
        "6", "--reps", "1"]


def write_byte_tokenizer(d) -> None:
    """A byte-level BPE without merges: every byte of the prompt text is its own token (ids 3..258); the
    model's other ids are plain (never encoded) vocabulary entries, so generated ids decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(sorted(byte_chars))}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), VOCAB)})  # the rest of the model's vocabulary
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    write_tokenizer(d, tok)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("perf-tiny")
    write_random_model(d, CONFIG, seed=3, std=0.15, norm_std=0.2)
    write_byte_tokenizer(d)
    return str(d)


@pytest.fixture(autouse=True)
def _fixed_bandwidth(monkeypatch):
    monkeypatch.setattr(perf, "measure_bandwidth", lambda *a, **k: 10.0)  # skip the 256 MB copy measurement


def run_perf(tmp_path, model, *extra) -> dict:
    out = tmp_path / "perf.json"
    assert perf.main(["--model", model, *ARGS, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_bf16_reports_both_sides_against_fp32_reference(tmp_path, tiny_model, capsys):
    pytest.importorskip("transformers")
    res = run_perf(tmp_path, tiny_model, "--dtype", "bf16")
    text = capsys.readouterr().out
    ref = res["reference"]
    assert [r["batch"] for r in ref] == [1, 2]
    assert [g["batch"] for g in res["correctness"]] == [1, 2]  # the tierlm-vs-transformers diff stays
    for r in ref:
        assert r["reference_dtype"] == "fp32"
        for side in ("tierlm", "transformers"):
            d = r[side]
            assert d["prompts"] == r["batch"] and 0 <= d["exact_match"] <= d["prompts"]
            assert (d["first_divergence"] is None) == (d["exact_match"] == d["prompts"])
    assert "reference_error" not in res
    assert "greedy diff tierlm-bf16 vs tierlm-fp32 reference, batch 2:" in text
    assert "greedy diff transformers-bf16 vs tierlm-fp32 reference, batch 2:" in text
    assert "greedy diff vs transformers, batch 2:" in text
    # rows: each prefill length (600 capped at the 512-token context - 1), then decode + e2e per batch
    assert [(r["phase"], r["prompt_len"], r["batch"]) for r in res["rows"]] == [
        ("prefill", 16, 1), ("prefill", 511, 1), ("decode", 8, 1), ("e2e", 8, 1), ("decode", 8, 2), ("e2e", 8, 2)]
    assert res["notes"] == ["prefill length 600 capped at 511: prompt + 1 new token must fit the 512-token context"]
    for r in res["rows"]:
        assert set(r["tok_per_s"]) == {"tierlm", "transformers"} and all(v > 0 for v in r["tok_per_s"].values())
        assert r["ratio"] > 0 and r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        assert (r["achieved_gb_s"] is not None) == (r["phase"] == "decode")


def test_no_reference_flag_and_fp32_runs_leave_it_out(tmp_path, tiny_model, capsys):
    res = run_perf(tmp_path, tiny_model, "--dtype", "bf16", "--no-peer", "--no-reference")
    assert "reference" not in res
    res = run_perf(tmp_path, tiny_model, "--dtype", "fp32", "--no-peer", "--attention-backend", "torch")
    assert "reference" not in res
    assert "reference" not in capsys.readouterr().out
    assert res["environment"]["attention_backend"] == "torch"  # the flag reaches the engine
    assert res["sides"] == ["tierlm"] and all(r["ratio"] is None for r in res["rows"])


def test_fp32_reference_reproduces_an_fp32_engine(tiny_model):
    """The self-check: the reference engine, on the prompts an fp32 run used, gives that run's tokens
    exactly, and reference_report says so."""
    from tierlm import LLM
    from tierlm.bench.phases import EngineSide, make_prompts

    llm = LLM(tiny_model, dtype="fp32", device="cpu", enable_prefix_caching=False, kv_cache_memory=16 << 20,
              max_num_seqs=3)
    prompt_sets = [make_prompts(llm.tokenizer, b, 8) for b in (1, 3)]
    assert len({tuple(p) for p in prompt_sets[1]}) == 3  # distinct prompts, so the check means something
    ours = [EngineSide(llm.engine).generate(p, 6).tokens for p in prompt_sets]
    del llm
    ref = perf.reference_tokens(tiny_model, "cpu", prompt_sets, 6)
    cases = [{"batch": len(p), "tierlm": t, "transformers": None} for p, t in zip(prompt_sets, ours)]
    rep = perf.reference_report(cases, ref)
    assert [r["tierlm"] for r in rep] == [{"prompts": 1, "exact_match": 1, "first_divergence": None},
                                          {"prompts": 3, "exact_match": 3, "first_divergence": None}]
    assert all("transformers" not in r for r in rep)
    # And a diverging side is reported as such, at the right token.
    bad = [list(t) for t in ours[1]]
    bad[2][4] = (bad[2][4] + 1) % VOCAB
    rep = perf.reference_report([{"batch": 3, "tierlm": bad, "transformers": ours[1]}], ref[1:])
    assert rep[0]["tierlm"] == {"prompts": 3, "exact_match": 2, "first_divergence": 4}
    assert rep[0]["transformers"] == {"prompts": 3, "exact_match": 3, "first_divergence": None}


def test_reference_failure_keeps_the_measurements(tmp_path, tiny_model, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("no room for fp32 weights")

    monkeypatch.setattr(perf, "reference_tokens", boom)
    res = run_perf(tmp_path, tiny_model, "--dtype", "bf16", "--no-peer")
    assert "reference" not in res and "no room" in res["reference_error"]
    assert res["rows"] and "fp32 reference check failed" in capsys.readouterr().out



def test_variants_are_sides_of_the_same_run(tmp_path, tiny_model, capsys):
    """--variant adds tierlm engines with changed settings to the paired run: their own tok/s, ratios, KV bytes per
    token (FP8: about a quarter of fp32) and greedy diff against the tierlm side."""
    res = run_perf(tmp_path, tiny_model, "--no-peer", "--variant", "fp8:kv_format=fp8_e4m3",
                   "--variant", "torch-eager:attention_backend=torch,enforce_eager=1")
    assert res["sides"] == ["tierlm", "fp8", "torch-eager"]
    kv = res["environment"]["kv_bytes_per_token"]
    assert kv["fp8"] < kv["tierlm"] / 3 and kv["torch-eager"] == kv["tierlm"]
    assert res["environment"]["variants"]["torch-eager"] == {"attention_backend": "torch", "enforce_eager": True}
    for r in res["rows"]:
        assert set(r["tok_per_s"]) == {"tierlm", "fp8", "torch-eager"}
    diffs = {(g["side"], g["batch"]) for g in res["correctness"]}
    assert diffs == {(s, b) for s in ("fp8", "torch-eager") for b in (1, 2)}
    # the torch backend computes the same fp32 attention: the same greedy tokens
    assert all(g["exact_match"] == g["prompts"] for g in res["correctness"] if g["side"] == "torch-eager")
    assert "greedy diff vs fp8, batch 2:" in capsys.readouterr().out


def test_the_gate_flags_a_broken_triton_variant(tmp_path, tiny_model, monkeypatch):
    """A triton side (the kernel under Triton's interpreter here) gives the tierlm side's greedy tokens; the same
    run with the kernel's logit scale dropped (a deliberately broken decode) is reported as diverging."""
    from tierlm.attention import TritonBackend

    if TritonBackend.unsupported(torch.device("cpu"), torch.float32, "fp32") is not None:
        pytest.skip("triton backend cannot run here")
    res = run_perf(tmp_path, tiny_model, "--no-peer", "--variant", "triton:attention_backend=triton")
    assert [g["exact_match"] == g["prompts"] for g in res["correctness"]] == [True, True]
    decode = TritonBackend.decode
    monkeypatch.setattr(TritonBackend, "decode", lambda self, q, layer, meta, scale: decode(self, q, layer, meta, 1.0))
    res = run_perf(tmp_path, tiny_model, "--no-peer", "--variant", "triton:attention_backend=triton")
    assert not all(g["exact_match"] == g["prompts"] for g in res["correctness"])


@pytest.mark.parametrize("bad", ["x", "tierlm:kv_format=fp8_e4m3", "a:nope=1", "a:kv_format", "a:sparse_budget=lots"])
def test_bad_variant_names_the_form(bad, capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(["--variant", bad])
    assert e.value.code == 2 and "--variant" in capsys.readouterr().err
