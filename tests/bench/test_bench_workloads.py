"""Workload generators: deterministic per seed, exact shapes, knob parsing, trace replay."""
import json
import zlib

import pytest

from tierlm.bench.arrivals import ArrivalPlan, arrival_times
from tierlm.bench.workloads import WORKLOADS, build_workload, parse_spec
from tierlm.core.errors import InvalidParameterError


class WordTokenizer:
    """One token per word, ids from a stable hash: enough to test shapes and determinism offline."""

    def encode(self, text, add_special_tokens=True):
        return [zlib.crc32(w.encode()) % 50000 for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


TOK = WordTokenizer()
SPECS = ["short-chat:n=5", "fixed:n=3,isl=40,osl=7,prefix=16", "long-doc-qa:docs=2,questions=3,doc=50,q=5,osl=4",
         "multi-turn:users=3,rounds=2,sys=20,user=5,osl=6", "batch-gen:n=4,isl=8,osl=30"]


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_tokens_other_seed_other_tokens(spec):
    a, b, c = (build_workload(spec, TOK, s) for s in (0, 0, 1))
    ids = lambda w: [(r.prompt_ids, r.history_from, r.turn_ids) for r in w.requests]  # noqa: E731
    assert ids(a) == ids(b)
    assert [r.max_tokens for r in a.requests] == [r.max_tokens for r in b.requests]
    assert [r.prompt_ids for r in a.requests] != [r.prompt_ids for r in c.requests]


def test_fixed_shape_and_shared_prefix():
    w = build_workload("fixed:n=3,isl=40,osl=7,prefix=16", TOK, 0)
    assert [len(r.prompt_ids) for r in w.requests] == [40, 40, 40]
    assert all(r.max_tokens == 7 for r in w.requests)
    first = w.requests[0].prompt_ids
    assert all(r.prompt_ids[:16] == first[:16] for r in w.requests)
    assert w.requests[1].prompt_ids[16:] != first[16:]
    assert w.max_seq_len == 47 and "3 requests x 40 in / 7 out" in w.shape


def test_multi_turn_history_grows_round_robin():
    w = build_workload("multi-turn:users=3,rounds=2,sys=20,user=5,osl=6", TOK, 0)
    assert [r.tag for r in w.requests] == ["u0r0", "u1r0", "u2r0", "u0r1", "u1r1", "u2r1"]
    r0, r1 = w.requests[0], w.requests[3]
    assert len(r0.prompt_ids) == 25 and r1.history_from == 0 and len(r1.turn_ids) == 5  # round 1 continues round 0
    assert w.prompt_len_bounds == [25, 25, 25, 36, 36, 36] and w.max_seq_len == 36 + 6
    assert all(w.known_prefix_ids(i)[:20] == r0.prompt_ids[:20] for i in range(6))  # shared system prompt
    assert w.shared_prefix_tokens == 20


def test_multi_turn_reply_lengths_vary_with_osl_min():
    """osl_min draws each reply's length from osl_min..osl, so users fall out of step; the prompt-length
    bounds follow each parent's own reply length; osl_min=0 keeps every reply at osl."""
    w = build_workload("multi-turn:users=4,rounds=3,sys=8,user=5,osl=20,osl_min=4", TOK, 0)
    outs = [r.max_tokens for r in w.requests]
    assert all(4 <= n <= 20 for n in outs) and len(set(outs)) > 1
    bounds = w.prompt_len_bounds
    for i, r in enumerate(w.requests):
        if r.history_from is not None:
            assert bounds[i] == bounds[r.history_from] + w.requests[r.history_from].max_tokens + 5
    assert {r.max_tokens for r in build_workload("multi-turn:users=4,rounds=3,osl=20", TOK, 0).requests} == {20}
    with pytest.raises(InvalidParameterError, match="osl_min 30 > osl 20"):
        build_workload("multi-turn:osl=20,osl_min=30", TOK, 0)


def test_long_doc_qa_is_question_major():
    w = build_workload("long-doc-qa:docs=2,questions=3,doc=50,q=5,osl=4", TOK, 0)
    assert [r.tag for r in w.requests] == ["d0q0", "d1q0", "d0q1", "d1q1", "d0q2", "d1q2"]
    assert w.requests[0].prompt_ids[:50] == w.requests[2].prompt_ids[:50]


def test_short_chat_lengths_within_knobs():
    w = build_workload("short-chat:n=20,sys=8,lo=3,hi=9", TOK, 3)
    assert all(8 + 3 <= len(r.prompt_ids) <= 8 + 9 and 3 <= r.max_tokens <= 9 for r in w.requests)


@pytest.mark.parametrize("spec,fragment", [
    ("nope", "unknown workload 'nope'"),
    ("fixed:bogus=1", "bad knob"),
    ("fixed:isl=abc", "is not a int"),
    ("fixed:isl=10,prefix=20", "prefix 20 > isl 10"),
    ("fixed:isl=0", "empty prompt"),
])
def test_bad_specs_raise_one_line(spec, fragment):
    with pytest.raises(InvalidParameterError) as e:
        build_workload(spec, TOK, 0)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_every_registered_workload_parses_bare():
    for name in WORKLOADS:
        kind, knobs = parse_spec(name)
        assert kind.name == name and knobs == {}


def test_trace_replay_shares_blocks_and_keeps_timestamps(tmp_path):
    rows = [{"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [1, 2]},
            {"timestamp": 1500, "input_length": 1200, "output_length": 3, "hash_ids": [1, 2, 3]},
            {"timestamp": 3000, "input_length": 300, "output_length": 2, "hash_ids": [9]}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = build_workload(f"trace:path={path},block=64", TOK, 0)  # scaled 64/512 = 1/8
    a, b, c = w.requests
    assert [len(r.prompt_ids) for r in w.requests] == [128, 150, 38]
    assert b.prompt_ids[:128] == a.prompt_ids  # hash ids 1, 2 shared
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 0.5, 2.0])
    assert [r.max_tokens for r in w.requests] == [5, 3, 2]
    assert w.timed and arrival_times(ArrivalPlan(concurrency=1), [r.arrival_s for r in w.requests]) == [0.0, 0.5, 2.0]


def test_trace_errors(tmp_path):
    with pytest.raises(InvalidParameterError, match="not found"):
        build_workload(f"trace:path={tmp_path}/missing.jsonl", TOK, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1}\n')
    with pytest.raises(InvalidParameterError, match="lacks numeric input_length"):
        build_workload(f"trace:path={bad}", TOK, 0)


def test_open_loop_arrivals_are_seeded_and_have_the_right_rate():
    plan = ArrivalPlan(concurrency=None, rate=10.0, burstiness=1.0, seed=7)
    a, b = plan.offsets(2000), plan.offsets(2000)
    assert a == b and a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    assert a[-1] / 1999 == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate
    assert ArrivalPlan(rate=10.0, seed=8).offsets(5) != plan.offsets(5)
    with pytest.raises(InvalidParameterError):
        ArrivalPlan(concurrency=0)
    with pytest.raises(InvalidParameterError):
        ArrivalPlan(rate=-1.0)


def test_exact_lengths_with_the_real_tokenizer():
    from tierlm.models.loader import load_checkpoint

    tok = load_checkpoint(None).tokenizer
    w = build_workload("multi-turn:users=2,rounds=3,sys=40,user=7,osl=5", tok, 0)
    assert w.prompt_len_bounds == [47, 47, 59, 59, 71, 71]
    assert [len(r.prompt_ids) for r in w.requests[:2]] == [47, 47] and all(len(r.turn_ids) == 7 for r in w.requests[2:])
    again = build_workload("multi-turn:users=2,rounds=3,sys=40,user=7,osl=5", tok, 0)
    assert [(r.prompt_ids, r.turn_ids) for r in w.requests] == [(r.prompt_ids, r.turn_ids) for r in again.requests]
