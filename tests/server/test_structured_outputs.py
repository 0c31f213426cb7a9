"""Structured outputs through the server with the official openai client: response_format (json_schema,
json_object) and vLLM's guided_* / structured_outputs fields, streamed and not; a constraint the grammar library
refuses, or two constraints at once, is a 400 naming the field."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from server_testing import assert_envelope, openai_client

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 30}, "year": {"type": "integer", "minimum": 1900,
                                                                            "maximum": 2030},
                   "genre": {"enum": ["drama", "comedy", "horror"]}},
    "required": ["title", "year", "genre"], "additionalProperties": False,
}
MSGS = [{"role": "user", "content": "Recommend a film."}]


@pytest.fixture(scope="module")
def client(server):
    c = openai_client(server.url)
    yield c
    c.close()


def test_response_format_json_schema(client):
    r = client.chat.completions.create(
        model="default", messages=MSGS, max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA, "strict": True}})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_response_format_json_object_sampled_n2(client):
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=200, temperature=1.0, seed=5, n=2,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        if c.finish_reason == "stop":  # sampled free-form JSON can run past max_tokens; what ends must parse
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.finish_reason == "length"
    assert any(c.finish_reason == "stop" for c in r.choices)


def test_streamed_json_schema_concatenates_to_valid_json(client):
    stream = client.chat.completions.create(
        model="default", messages=MSGS, max_tokens=120, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_extension_fields(client):
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=10, temperature=0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model="default", prompt="Order number:", max_tokens=20, temperature=0.8, seed=1,
                                  extra_body={"guided_regex": r"[A-Z]{2}-\d{4}"})
    assert re.fullmatch(r"[A-Z]{2}-\d{4}", r.choices[0].text), r.choices[0].text
    r = client.completions.create(model="default", prompt="A film as JSON:", max_tokens=120, temperature=0,
                                  extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"grammar": 'start: "A" | "B"'}})
    assert r.choices[0].message.content in ("A", "B")


def test_a_schema_the_library_refuses_is_a_400_naming_the_field(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MSGS, max_tokens=10, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 7}}})
    body = e.value.body
    assert body["param"] == "response_format" and "cannot be compiled" in body["message"], body
    err = assert_envelope(http.post("/v1/completions", json={"prompt": "x", "guided_regex": "(?<=a)b"}),
                          400, "guided_regex")
    assert "Rust regex" in err["message"]
    err = assert_envelope(http.post("/v1/chat/completions", json={"messages": MSGS, "guided_choice": []}),
                          400, "guided_choice")
    assert "non-empty list" in err["message"]


def test_two_constraints_or_a_schema_less_format_are_400(http):
    err = assert_envelope(http.post("/v1/chat/completions", json={
        "messages": MSGS, "response_format": {"type": "json_object"}, "guided_regex": "a+"}), 400, "guided_regex")
    assert "one constraint per request" in err["message"]
    err = assert_envelope(http.post("/v1/chat/completions", json={
        "messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        400, "response_format")
    assert "json_schema.schema" in err["message"]
    err = assert_envelope(http.post("/v1/chat/completions", json={
        "messages": MSGS, "structured_outputs": {"regexp": "a"}}), 400, "structured_outputs")
    assert "regex" in err["message"]


def test_server_stays_healthy_after_rejections(client):
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].message.role == "assistant"
