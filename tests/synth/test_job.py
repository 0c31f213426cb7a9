"""Synth job specs: expansion, stable ids and seeds, and bad input named with its fix."""
from __future__ import annotations

import json

import pytest

from tierlm.core.errors import InvalidParameterError
from tierlm.synth.check import Checker
from tierlm.synth.dedup import Deduplicator
from tierlm.synth.job import Dedup, job_from_dict, load_job, sample_seed


def job(tmp_path, **kw):
    doc = {"templates": {"t": "A {{ a }} in {{ b }}."}, "variables": {"a": ["x", "y"], "b": ["p", "q", "r"]}}
    doc.update(kw)
    return job_from_dict(doc, tmp_path)


def test_expansion_order_ids_and_seeds(tmp_path):
    j = job(tmp_path, samples_per_prompt=2, templates={"t": "A {{ a }} in {{ b }}.", "u": "Only {{ b }}"})
    samples = j.samples()
    assert len(samples) == (2 * 3 + 3) * 2
    assert [s.prompt.text for s in samples[:4]] == ["A x in p.", "A x in p.", "A x in q.", "A x in q."]
    assert samples[0].id == "t/0/0" and samples[1].id == "t/0/1" and samples[12].id == "u/0/0"
    assert samples[12].prompt.text == "Only p" and samples[12].prompt.variables == {"b": "p"}
    assert [s.index for s in samples] == list(range(len(samples)))
    assert len({s.seed for s in samples}) == len(samples)
    assert samples[5].seed == sample_seed(j.seed, samples[5].id)  # a sample's seed is its id's, whatever the order
    assert job(tmp_path, seed=1).samples()[0].seed != samples[0].seed


def test_variables_from_files(tmp_path):
    (tmp_path / "c.csv").write_text("name,pop\nOslo,1\nLima,2\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"w": "sun"}) + "\n" + json.dumps({"w": "rain"}) + "\n")
    (tmp_path / "e.txt").write_text("one\n\ntwo\n")
    j = job_from_dict({"templates": "{{ c }} {{ d }} {{ e }}", "variables": {
        "c": {"file": "c.csv", "column": "name"}, "d": {"file": "d.jsonl", "field": "w"}, "e": {"file": "e.txt"}}},
        tmp_path)
    assert [p.text for p in j.prompts()][:3] == ["Oslo sun one", "Oslo sun two", "Oslo rain one"]
    assert len(j.prompts()) == 8


def test_digest_tracks_what_records_depend_on(tmp_path):
    a = job(tmp_path)
    assert a.digest == job(tmp_path, scan={"pii": False}).digest  # scans do not change records
    assert a.digest != job(tmp_path, sampling={"temperature": 0.5}).digest
    assert a.digest != job(tmp_path, constraint={"regex": "a+"}).digest


@pytest.mark.parametrize("doc, words", [
    ({"templates": {"t": "{{ missing }}"}}, ["uses missing", "add missing"]),
    ({"templates": {"t": "{{ a }"}, "variables": {"a": [1]}}, ["template 't'", "Jinja2"]),
    ({"templates": {"t": "x"}, "bogus": 1}, ["unknown key", "bogus"]),
    ({"templates": {}}, ["templates must map"]),
    ({"templates": {"t": "{{ a }}"}, "variables": {"a": []}}, ["no values"]),
    ({"templates": {"t": "{{ a }}"}, "variables": {"a": {"file": "nope.csv"}}}, ["does not exist"]),
    ({"templates": {"t": "x"}, "sampling": {"temprature": 1}}, ["unknown key", "temprature"]),
    ({"templates": {"t": "x"}, "sampling": {"temperature": -1}}, ["temperature"]),
    ({"templates": {"t": "x"}, "constraint": {"regex": "a", "choice": ["a"]}}, ["exactly one"]),
    ({"templates": {"t": "x"}, "constraint": {"json_file": "nope.json"}}, ["does not exist"]),
    ({"templates": {"t": "x"}, "constraint": {"json": {"type": "object", "properties": 3}}}, ["cannot be compiled"]),
    ({"templates": {"t": "x"}, "constraint": {"regex": "(?<=a)b"}}, ["cannot be compiled", "Rust regex"]),
    ({"templates": {"t": "x"}, "dedup": {"near_threshold": 2}}, ["near_threshold"]),
    ({"templates": {"t": "x"}, "samples_per_prompt": 0}, ["samples_per_prompt"]),
    ({"templates": {"t": "x"}, "scan": {"members": "nope.txt"}}, ["does not exist"]),
])
def test_bad_specs_name_the_problem(tmp_path, doc, words):
    with pytest.raises(InvalidParameterError) as e:
        job_from_dict(doc, tmp_path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_load_job_errors(tmp_path):
    with pytest.raises(InvalidParameterError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("templates: [unclosed\n")
    with pytest.raises(InvalidParameterError, match="not valid YAML"):
        load_job(tmp_path / "bad.yaml")
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object"}))
    (tmp_path / "ok.yaml").write_text("templates: {t: hi}\nconstraint: {json_file: schema.json}\n")
    j = load_job(tmp_path / "ok.yaml")
    assert j.name == "ok" and j.constraint.json == {"type": "object"}


def test_checker_reasons(tmp_path):
    j = job(tmp_path, constraint={"json": {"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"]}})
    c = Checker(j.constraint)
    assert c.check('{"a": 3}', "stop") is None
    assert c.check('{"a": 3', "stop").startswith("invalid JSON")
    assert c.check('{"b": 3}', "stop").startswith("schema: 'a' is a required property")
    assert c.check('{"a": "x"}', "stop").endswith("at a")
    assert c.check('{"a": 3}', "length") == "truncated at max_tokens"
    assert Checker(job(tmp_path, constraint={"regex": r"\d+"}).constraint).check("12a", "stop") is not None
    assert Checker(job(tmp_path, constraint={"choice": ["a", "b"]}).constraint).check("b", "stop") is None
    assert Checker(None).check("  ", "stop") == "empty"


def test_dedup_exact_and_near():
    d = Deduplicator(Dedup(near_threshold=0.6, shingle=2))
    base = "the quick brown fox jumps over the lazy dog near the old river bank today"
    assert d.check("a", base) is None
    assert d.check("b", "  The QUICK brown fox jumps over the lazy dog near the old river bank today ") \
        == "duplicate of a"
    near = d.check("c", base.replace("today", "tonight"))
    assert near is not None and near.startswith("near-duplicate of a (Jaccard")
    assert d.check("d", "an entirely different sentence about quantum chromodynamics and lattice gauge theory") is None
    off = Deduplicator(Dedup(exact=False, near_threshold=None))
    assert off.check("a", base) is None and off.check("b", base) is None


def test_cli_help_and_missing_job(capsys):
    from tierlm.cli import main

    assert main(["synth", "-h"]) == 0 and "tierlm synth scan" in capsys.readouterr().out
    assert main(["synth"]) == 2
    assert main(["synth", "/nonexistent/job.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
