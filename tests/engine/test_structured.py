"""Structured outputs on the default model: every constrained output parses and validates (greedy and sampled,
batched with unconstrained requests, n > 1), the mask is what makes it so, and a constraint the grammar library
refuses is an InvalidParameterError that queues nothing."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tierlm import SamplingParams, StructuredOutputsParams
from tierlm.core.errors import InvalidParameterError
from tierlm.core.request import Request
from tierlm.engine.sampler import Sampler
from tierlm.engine.structured import StructuredOutputs, unpack

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "A customer record:", "Hello there", "Write JSON for a user from Rome."]


def chat(llm, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def constrained(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def test_json_schema_greedy_and_sampled_batched_with_unconstrained(default_llm):
    llm = default_llm
    free = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.generate([chat(llm, "Tell me about Paris.")], free)[0].outputs[0].token_ids
    prompts, params = [], []
    for i, p in enumerate(PROMPTS):
        prompts.append(chat(llm, p))
        params.append(SamplingParams(temperature=0 if i % 2 == 0 else 0.9, seed=i, max_tokens=160,
                                     structured_outputs=constrained(json=PERSON)))
    prompts.insert(2, chat(llm, "Tell me about Paris."))
    params.insert(2, free)
    outs = llm.generate(prompts, params)
    assert outs[2].outputs[0].token_ids == alone  # the unconstrained row is untouched by its guided neighbours
    for o in outs[:2] + outs[3:]:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)


def test_the_mask_is_what_makes_it_valid(default_llm):
    """Unconstrained, the same prompt's greedy reply is not JSON of the schema: the mask did the work."""
    llm = default_llm
    ids = chat(llm, "Hello there")
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=60))[0].outputs[0].text
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(free), PERSON)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=160,
                                             structured_outputs=constrained(json=PERSON)))[0].outputs[0]
    jsonschema.validate(json.loads(out.text), PERSON)


def test_regex_choice_json_object_and_lark(default_llm):
    llm = default_llm
    cases = [
        (constrained(regex=r"[A-Z][a-z]{2,8}-\d{3}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,8}-\d{3}", t)),
        (constrained(choice=["positive", "negative", "neutral"]), lambda t: t in ("positive", "negative", "neutral")),
        (constrained(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (constrained(grammar='start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,2}/'),
         lambda t: re.fullmatch(r"yes|no|maybe [0-9]{1,2}", t)),
    ]
    for temp in (0.0, 1.0):
        params = [SamplingParams(temperature=temp, seed=7, max_tokens=200, structured_outputs=s) for s, _ in cases]
        outs = llm.generate([chat(llm, "Classify: I love this film.")] * len(cases), params)
        for (s, ok), o in zip(cases, outs):
            c = o.outputs[0]
            assert c.finish_reason == "stop" and ok(c.text), (s.kind, temp, c.text)


def test_n_sequences_each_follow_the_constraint(default_llm):
    outs = default_llm.generate([chat(default_llm, "Pick a colour.")], SamplingParams(
        n=3, temperature=1.2, seed=3, max_tokens=10, structured_outputs=constrained(choice=["red", "green", "blue"])))
    texts = [c.text for c in outs[0].outputs]
    assert all(t in ("red", "green", "blue") for t in texts), texts


def test_grammar_completion_beats_min_tokens_and_ignore_eos(default_llm):
    """A complete grammar ends the sequence: min_tokens and ignore_eos cannot push it past its end."""
    out = default_llm.generate([chat(default_llm, "Yes or no?")], SamplingParams(
        temperature=0, max_tokens=30, min_tokens=20, ignore_eos=True,
        structured_outputs=constrained(choice=["yes", "no"])))[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_overlapped_masks_give_the_same_tokens(default_llm):
    """Masks computed on the worker during the forward pass (the default on a GPU) or after it (on a CPU)."""
    llm = default_llm
    p = SamplingParams(temperature=0.7, seed=11, max_tokens=120, structured_outputs=constrained(json=PERSON))
    ids = [chat(llm, t) for t in PROMPTS[:3]]
    so = llm.engine.structured
    default, waited = so.overlap, so.counters["wait_seconds"]
    try:
        so.overlap = False
        a = [o.outputs[0].token_ids for o in llm.generate(ids, p)]
        so.overlap = True
        b = [o.outputs[0].token_ids for o in llm.generate(ids, p)]
    finally:
        so.overlap = default
    assert a == b
    assert so.counters["wait_seconds"] > waited  # the second run did collect masks from the worker


@pytest.mark.parametrize("spec, param", [
    (dict(json={"type": "object", "properties": 3}), "json_schema"),
    (dict(json={"type": "bogus"}), "json_schema"),
    (dict(json="{not json"), "json_schema"),
    (dict(regex="(?=look)ahead"), "regex"),
    (dict(grammar="start ::= 'a'"), "grammar"),
])
def test_a_rejected_constraint_names_itself_and_queues_nothing(default_llm, spec, param):
    engine = default_llm.engine
    with pytest.raises(InvalidParameterError) as e:
        engine.add_request("hi", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**spec)))
    assert e.value.param == param and "cannot be compiled" in str(e.value)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("spec", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"choice": ["a", ""]},
                                  {"json": 3}, {"bogus": 1}])
def test_malformed_params_are_refused(spec):
    with pytest.raises(InvalidParameterError):
        SamplingParams(structured_outputs=spec)


def test_equal_constraints_compile_once(default_llm):
    so = default_llm.engine.structured
    before = dict(so.counters)
    so.guide(constrained(json={"type": "object", "properties": {"zz": {"type": "integer"}}}))
    so.guide(constrained(json=json.dumps({"properties": {"zz": {"type": "integer"}}, "type": "object"})))
    assert so.counters["compiled"] == before["compiled"] + 1
    assert so.counters["cache_hits"] == before["cache_hits"] + 1


# ---- the mask itself -----------------------------------------------------------------------------------------
def test_mask_allows_exactly_the_grammar_s_tokens(default_llm):
    tok = default_llm.engine.tokenizer
    vocab = default_llm.engine.model_config.vocab_size
    so = StructuredOutputs(tok, vocab)
    g = so.guide(constrained(choice=["yes", "no"]))
    bits = torch.empty((1, so.words), dtype=torch.int32)
    g.fill(bits[0])
    allowed = unpack(bits, vocab)[0].nonzero().flatten().tolist()
    texts = {tok.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert tok.encode("yes", add_special_tokens=False)[0] in allowed
    for t in tok.encode("yes", add_special_tokens=False):
        assert g.accept(t)
    assert g.done
    so.close()


def test_unpack_matches_bit_order():
    bits = torch.tensor([[0b101, -2**31]], dtype=torch.int32)  # tokens 0, 2 and 63
    assert unpack(bits, 64)[0].nonzero().flatten().tolist() == [0, 2, 63]
    assert unpack(bits, 40)[0].nonzero().flatten().tolist() == [0, 2]


def _req(rid: str, **kw) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**kw))


def test_sampler_masks_guided_rows_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    reqs = [_req("a", temperature=0), _req("b", temperature=0), _req("c", temperature=1.0, seed=1)]
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, [5, 7]] = True
    mask[1, [9]] = True
    out = Sampler((0,))(logits, reqs, ([0, 2], mask))
    assert out.token_ids[0] == (5 if logits[0, 5] > logits[0, 7] else 7)
    assert out.token_ids[1] == int(logits[1].argmax())
    assert out.token_ids[2] == 9


def test_sampler_lets_the_grammar_win_over_min_tokens():
    """min_tokens masks EOS; when EOS is all the grammar allows, EOS is taken (not an arbitrary token)."""
    logits = torch.randn(1, 20)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 0] = True
    out = Sampler((0,))(logits, [_req("a", temperature=0, min_tokens=5, max_tokens=8)], ([0], mask))
    assert out.token_ids == [0]
