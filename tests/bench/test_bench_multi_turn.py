"""Multi-turn workloads with real dependencies: round r+1 of a user waits for round r's reply and carries its
actual output tokens; both drivers (in-process engine, HTTP) send it only once that reply finished."""
from __future__ import annotations

import zlib

import pytest

from tierlm.bench.arrivals import ArrivalPlan, ArrivalQueue
from tierlm.bench.workloads import BenchRequest, build_workload, check_dependencies, resolve_prompt


class WordTokenizer:
    """One token per word (ids from a stable hash, below `vocab`); decodes to `w<id>` words, which encode back
    to other ids (as a real tokenizer's round trip need not be exact)."""

    def __init__(self, vocab: int = 50000, low: int = 0):
        self.vocab, self.low = vocab, low

    def encode(self, text, add_special_tokens=True):
        return [self.low + zlib.crc32(w.encode()) % (self.vocab - self.low) for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


TOK = WordTokenizer()
SPEC = "multi-turn:users=3,rounds=3,sys=20,user=5,osl=6"


# ---- the workload ---------------------------------------------------------------------------------------
def test_later_rounds_continue_the_same_users_earlier_round():
    w = build_workload(SPEC, TOK, 0)
    assert [r.tag for r in w.requests] == ["u0r0", "u1r0", "u2r0", "u0r1", "u1r1", "u2r1", "u0r2", "u1r2", "u2r2"]
    assert [r.history_from for r in w.requests] == [None, None, None, 0, 1, 2, 3, 4, 5]
    assert all(r.prompt_ids == [] and len(r.turn_ids) == 5 and r.max_tokens == 6 for r in w.requests[3:])
    assert len({tuple(r.turn_ids) for r in w.requests[3:]}) == 6  # every turn is fresh text


def test_resolved_prompt_is_parent_prompt_plus_parent_output_plus_turn():
    w = build_workload(SPEC, TOK, 0)
    r0, r1, r2 = w.requests[0], w.requests[3], w.requests[6]
    out0, out1 = [7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]
    p0 = resolve_prompt(r0)
    assert p0 == r0.prompt_ids and p0 is not r0.prompt_ids
    p1 = resolve_prompt(r1, p0, out0)
    assert p1 == r0.prompt_ids + out0 + r1.turn_ids
    p2 = resolve_prompt(r2, p1, out1)
    assert p2 == r0.prompt_ids + out0 + r1.turn_ids + out1 + r2.turn_ids
    assert [len(p0), len(p1), len(p2)] == w.prompt_len_bounds[0:9:3]  # the bounds are the exact lengths
    with pytest.raises(ValueError, match="needs that request's prompt and output"):
        resolve_prompt(r1)


def test_long_history_knobs_and_bounds():
    w = build_workload("multi-turn:users=8,rounds=4,sys=1024,user=256,osl=64", TOK, 0)
    assert w.max_prompt_len == 1024 + 4 * 256 + 3 * 64 == 2240 and w.max_seq_len == 2240 + 64
    assert w.shared_prefix_tokens == 1024 and "history up to 2240 tokens" in w.shape
    assert all(r.max_tokens == 64 for r in w.requests)  # osl is every round's max_tokens
    h = build_workload("multi-turn:users=4,rounds=4,hist=4096,user=256,osl=128", TOK, 0)
    assert h.max_prompt_len == 256 + 4096 + 4 * 256 + 3 * 128 and h.max_seq_len == h.max_prompt_len + 128
    assert h.shared_prefix_tokens == 256  # each user's history is its own
    assert len({tuple(r.prompt_ids[256:256 + 4096]) for r in h.requests[:4]}) == 4
    assert "4096-token history per user" in h.shape
    d = build_workload("long-doc-qa:docs=4,questions=4,doc=4096,q=64", TOK, 0)
    assert d.max_prompt_len == 4160 and d.max_seq_len == 4160 + 32


def test_dependencies_must_point_back():
    check_dependencies([BenchRequest([1], 2), BenchRequest([], 2, history_from=0, turn_ids=[3])])
    with pytest.raises(ValueError, match="not an earlier request"):
        check_dependencies([BenchRequest([], 2, history_from=0, turn_ids=[3])])
    with pytest.raises(ValueError, match="not an earlier request"):
        ArrivalQueue(ArrivalPlan(concurrency=1), [None, None], [1, None])


# ---- the arrival queue both drivers use ------------------------------------------------------------------
def test_queue_closed_loop_sends_dependents_only_after_their_parent_in_workload_order():
    q = ArrivalQueue(ArrivalPlan(concurrency=4), [None] * 4, [None, None, 0, 1])
    q.start(100.0)
    assert [q.pop(100.0, k) for k in range(2)] == [(0, 100.0), (1, 100.0)]
    assert q.pop(100.0, 2) is None and q.next_due() is None and q  # rounds 1 wait for their parents
    q.finished(1, 101.0)
    assert q.pop(101.5, 1) == (3, 101.5) and q.pop(101.5, 2) is None
    q.finished(0, 102.0)
    assert q.pop(102.0, 1) == (2, 102.0) and not q
    capped = ArrivalQueue(ArrivalPlan(concurrency=1), [None] * 2, [None, None])
    capped.start(0.0)
    assert capped.pop(0.0, 0) == (0, 0.0) and capped.pop(0.0, 1) is None and capped.wait_s(0.0, 1) is None


def test_queue_open_loop_dependent_arrives_at_max_of_plan_and_parent_finish():
    q = ArrivalQueue(ArrivalPlan(concurrency=None, rate=1.0), [0.0, 1.0, 2.0, 3.0], [None, None, 0, 1])
    q.start(10.0)
    assert q.pop(10.0, 0) == (0, 10.0) and q.pop(10.5, 1) is None and q.wait_s(10.5, 1) == pytest.approx(0.5)
    q.finished(0, 15.0)  # parent 0 finished after request 2's planned arrival (12.0): it arrives at 15.0
    assert q.pop(11.0, 1) == (1, 11.0) and q.next_due() == 15.0 and q.pop(14.9, 1) is None
    assert q.pop(15.2, 1) == (2, 15.0)
    q.finished(1, 11.5)  # parent 1 finished before request 3's planned arrival (13.0): the plan holds
    assert q.next_due() == 13.0 and q.pop(13.0, 0) == (3, 13.0) and not q


def test_queue_drops_the_conversation_of_a_failed_request():
    q = ArrivalQueue(ArrivalPlan(concurrency=2), [None] * 5, [None, None, 0, 1, 2])
    q.start(0.0)
    q.pop(0.0, 0), q.pop(0.0, 1)
    assert q.finished(0, 1.0, ok=False) == [2, 4] and q.unsent == 1
    q.finished(1, 1.0)
    assert q.pop(1.0, 0) == (3, 1.0) and not q


# ---- the in-process driver on a tiny random model --------------------------------------------------------
VOCAB = 320


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from helpers.random_model import write_random_model, write_tokenizer
    from tierlm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from tierlm.engine.llm_engine import LLMEngine

    d = tmp_path_factory.mktemp("multi-turn-tiny")
    config = ModelConfig(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
    write_random_model(d, config, seed=3, std=0.15, norm_std=0.2)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # a byte-level BPE without merges (the model never reads it)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(sorted(byte_chars))}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    write_tokenizer(d, tok)
    return LLMEngine(EngineConfig(model=str(d), dtype="fp32", device="cpu", cache=CacheConfig(num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256)))


def _check_dependent_run(w, run):
    recs = {r.index: r for r in run.records}
    assert run.complete and sorted(recs) == list(range(len(w.requests)))
    for i, req in enumerate(w.requests):
        rec = recs[i]
        assert rec.ok and rec.token_ids is not None and len(rec.token_ids) == req.max_tokens
        assert rec.num_input == len(rec.prompt_ids) == w.prompt_len_bounds[i]
        if req.history_from is None:
            assert rec.prompt_ids == req.prompt_ids
            continue
        parent = recs[req.history_from]
        assert rec.sent >= parent.done  # (a) sent only after the same user's earlier round finished
        assert rec.token_times[0] > parent.done
        # (b) the resolved prompt carries the parent's ACTUAL output tokens, then the new turn
        assert rec.prompt_ids == parent.prompt_ids + parent.token_ids + req.turn_ids
    return recs


def test_engine_driver_sends_round_1_after_round_0_with_its_real_reply(tiny_engine):
    from tierlm.bench.engine_driver import run_engine

    w = build_workload("multi-turn:users=2,rounds=2,sys=24,user=8,osl=6", WordTokenizer(VOCAB, 3), 0)
    run = run_engine(tiny_engine, w.requests, ArrivalPlan(concurrency=4))  # room for all: only the dependency holds
    recs = _check_dependent_run(w, run)
    # both round-0 requests go at once; each round 1 right after its parent (the first admission after that step)
    assert recs[0].sent == recs[1].sent and [r.index for r in run.records[:2]] == [0, 1]
    assert all(recs[i].sent - recs[i - 2].done < 0.5 for i in (2, 3))
    assert len({tuple(recs[i].token_ids) for i in (0, 1)}) == 2  # distinct replies, so (b) is not vacuous
    # greedy: the same workload again gives the same replies, so the same resolved prompts (what the diff needs)
    again = {r.index: r for r in run_engine(tiny_engine, w.requests, ArrivalPlan(concurrency=1)).records}
    assert all(again[i].prompt_ids == recs[i].prompt_ids and again[i].token_ids == recs[i].token_ids for i in recs)


def test_engine_driver_open_loop_dependent_arrival(tiny_engine):
    from tierlm.bench.engine_driver import run_engine

    w = build_workload("multi-turn:users=2,rounds=2,sys=16,user=4,osl=4", WordTokenizer(VOCAB, 3), 1)
    plan = ArrivalPlan(concurrency=None, rate=1000.0, seed=3)  # round 1's planned arrivals pass long before replies end
    run = run_engine(tiny_engine, w.requests, plan)
    recs = _check_dependent_run(w, run)
    for i in (2, 3):
        assert recs[i].sent == recs[w.requests[i].history_from].done  # arrival = the parent's finish


# ---- the HTTP driver against the stub server (tests/bench/conftest.py: replies " t0 t1 ...") -------------
def test_http_driver_sends_round_1_after_round_0_with_its_reply(stub):
    pytest.importorskip("httpx")
    from tierlm.bench.http_driver import HttpDriver

    tok = WordTokenizer()
    w = build_workload("multi-turn:users=2,rounds=2,sys=8,user=3,osl=4", tok, 0)
    run = HttpDriver(stub.url, tok).run(w.requests, ArrivalPlan(concurrency=4))
    assert run.complete and len(run.records) == 4
    recs = {r.index: r for r in run.records}
    reply = tok.encode(" t0 t1 t2 t3")  # the stub streams no token ids: the reply text, encoded
    for i in (2, 3):
        parent, rec = recs[i - 2], recs[i]
        assert rec.ok and rec.sent >= parent.done
        assert rec.prompt_ids == parent.prompt_ids + reply + w.requests[i].turn_ids
        assert rec.num_input == len(rec.prompt_ids)
    bodies = {b["prompt"]: b for b in stub.bodies}
    assert set(bodies) == {tok.decode(recs[i].prompt_ids) for i in range(4)}
    assert all(bodies[tok.decode(recs[i].prompt_ids)].get("return_token_ids") is (True if i < 2 else None)
               for i in range(4))  # asked for only where a later round needs the reply ids


def test_http_driver_uses_streamed_token_ids_and_drops_continuations_of_failed_requests(stub):
    pytest.importorskip("httpx")
    from tierlm.bench.http_driver import HttpDriver
    from tierlm.bench.metrics import RequestRecord, summarize

    rec = RequestRecord(sent=0.0, num_input=1)
    HttpDriver._on_chunk({"choices": [{"text": " a", "token_ids": [5, 6]}]}, rec, 1.0)
    HttpDriver._on_chunk({"choices": [{"text": "b", "token_ids": [7]}]}, rec, 2.0)
    assert rec.token_ids == [5, 6, 7] and rec.text == " ab"
    driver = HttpDriver(stub.url, WordTokenizer())
    assert driver.reply_ids(rec) == [5, 6, 7]  # the server's own ids win over the encoded text

    reqs = [BenchRequest([1, 2], 500), BenchRequest([1, 3], 2),  # the stub refuses max_tokens > 100
            BenchRequest([], 2, history_from=0, turn_ids=[4]), BenchRequest([], 2, history_from=1, turn_ids=[5])]
    run = driver.run(reqs, ArrivalPlan(concurrency=2))
    recs = {r.index: r for r in run.records}
    assert run.complete and sorted(recs) == [0, 1, 2, 3]
    assert "HTTP 400" in recs[0].error and "request 0 it continues failed" in recs[2].error
    assert recs[1].ok and recs[3].ok and len(stub.bodies) == 3  # the lost continuation was never sent
    assert summarize(run.records, run.wall_s).failed_requests == 2
