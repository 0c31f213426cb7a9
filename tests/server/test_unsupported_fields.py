"""Request fields that OpenAI or vLLM clients send but tierlm does not implement: values that would change
the output get a 400 envelope naming the field and the fix; harmless values and unknown fields are accepted."""
from __future__ import annotations

import logging

import openai
import pytest
from server_testing import assert_envelope, openai_client

from tierlm.server.protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, unsupported_field

MSGS = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def client(server):
    c = openai_client(server.url)
    yield c
    c.close()


CHAT_REJECTED = [
    ("tools", [TOOL]),
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "get_weather"}}),
    ("functions", [TOOL["function"]]),
    ("function_call", {"name": "get_weather"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "Hello"}),
    ("web_search_options", {}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("service_tier", "priority"),
    ("store", True),
    ("logit_bias", {"5": 1.0}),
    ("echo", True),
    ("continue_final_message", True),
    ("chat_template", "{{ messages }}"),
    ("chat_template_kwargs", {"enable_thinking": False}),
    ("documents", [{"title": "a", "text": "b"}]),
    ("use_beam_search", True),
    ("prompt_logprobs", 0),
    ("allowed_token_ids", [1, 2]),
    ("bad_words", ["no"]),
    ("truncate_prompt_tokens", 8),
    ("return_tokens_as_token_ids", True),
]

COMPLETION_REJECTED = [
    ("echo", True),
    ("suffix", "tail"),
    ("best_of", 2),
    ("logit_bias", {"5": -100}),
    ("prompt_logprobs", 1),
    ("truncate_prompt_tokens", 8),
]

CHAT_ACCEPTED = [
    ("response_format", {"type": "text"}),
    ("tools", []),
    ("tool_choice", "none"),
    ("tool_choice", "auto"),  # without tools: no tool call can happen
    ("function_call", "none"),
    ("parallel_tool_calls", True),
    ("modalities", ["text"]),
    ("service_tier", "auto"),
    ("store", False),
    ("metadata", {"team": "a"}),
    ("user", "u-1"),
    ("logit_bias", {}),
    ("echo", False),
    ("chat_template_kwargs", {}),
    ("use_beam_search", False),
    ("some_future_field", {"x": 1}),  # unknown: ignored, as vLLM does
]


def _check_rejected(resp, field: str) -> None:
    err = assert_envelope(resp, 400, field)
    assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_parameter"
    assert err["message"].startswith(field) and "is not supported yet by this server (tierlm); " in err["message"]
    assert "remove it" in err["message"] or "instead" in err["message"], err["message"]  # the fix is named


@pytest.mark.parametrize("field, value", CHAT_REJECTED, ids=lambda x: x if isinstance(x, str) else None)
def test_chat_rejects_unimplemented_fields(http, field, value):
    resp = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, field: value})
    _check_rejected(resp, field)


@pytest.mark.parametrize("field, value", COMPLETION_REJECTED, ids=lambda x: x if isinstance(x, str) else None)
def test_completion_rejects_unimplemented_fields(http, field, value):
    resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, field: value})
    _check_rejected(resp, field)


def test_streamed_request_is_rejected_before_streaming(http):
    resp = http.post("/v1/chat/completions", json={"messages": MSGS, "stream": True, "tools": [TOOL]})
    _check_rejected(resp, "tools")


def test_rejection_names_the_value_and_the_fix(http):
    err = assert_envelope(http.post("/v1/chat/completions", json={"messages": MSGS, "tool_choice": "required"}),
                          400, "tool_choice")
    assert err["message"].startswith('tool_choice="required"') and 'set "none"' in err["message"]
    err = assert_envelope(http.post("/v1/completions", json={"prompt": "Hi", "truncate_prompt_tokens": 8}),
                          400, "truncate_prompt_tokens")
    assert "tierlm_max_prompt_tokens" in err["message"] and "truncate_left" in err["message"]


def test_tool_choice_auto_with_tools_names_tools_first(http):
    resp = http.post("/v1/chat/completions", json={"messages": MSGS, "tools": [TOOL], "tool_choice": "auto"})
    _check_rejected(resp, "tools")


@pytest.mark.parametrize("field, value", CHAT_ACCEPTED, ids=lambda x: x if isinstance(x, str) else None)
def test_chat_accepts_harmless_values(http, field, value):
    resp = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, field: value})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


def test_completion_accepts_harmless_values(http):
    body = {"prompt": "Hi", "max_tokens": 1, "n": 2, "best_of": 2, "echo": False, "suffix": None,
            "response_format": {"type": "text"}, "logit_bias": {}, "user": "u", "store": False,
            "metadata": {"k": "v"}, "service_tier": "default", "some_future_field": 1}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 2


def test_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MSGS, max_tokens=1, tools=[TOOL])
    assert e.value.status_code == 400 and e.value.body["param"] == "tools"
    assert e.value.body["code"] == "unsupported_parameter"
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=1, response_format={"type": "text"},
                                       store=False, metadata={"a": "b"}, user="u", service_tier="auto",
                                       parallel_tool_calls=False, tool_choice="none")
    assert r.choices[0].message.role == "assistant"


def test_unknown_fields_are_logged_once_at_debug(http, caplog):
    caplog.set_level(logging.DEBUG, logger="tierlm.server.serving")
    for _ in range(2):
        resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "zz_unknown_once": True})
        assert resp.status_code == 200, resp.text
    hits = [r for r in caplog.records if "zz_unknown_once" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.DEBUG


def test_schema_documents_the_fields(http):
    props = http.get("/openapi.json").json()["components"]["schemas"]
    chat, completion = props["ChatCompletionRequest"]["properties"], props["CompletionRequest"]["properties"]
    for field in ("response_format", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                  "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "service_tier",
                  "store", "metadata", "user", "logit_bias", "guided_json"):
        assert field in chat, field
    for field in ("response_format", "echo", "suffix", "best_of", "logit_bias", "guided_json", "prompt_logprobs"):
        assert field in completion, field
    assert "not supported yet" in chat["tools"]["description"]


def test_every_rule_names_a_declared_field_and_accepts_its_default():
    models = (ChatCompletionRequest, CompletionRequest)
    for name in UNSUPPORTED:
        assert any(name in m.model_fields for m in models), name
    assert unsupported_field(ChatCompletionRequest(messages=MSGS)) is None
    assert unsupported_field(CompletionRequest(prompt="Hi")) is None
