"""OpenAI request bodies (pydantic), plus tierlm's extension fields (prefixed `tierlm_` or vLLM-named).

The models only check shapes and ranges that the OpenAPI schema should state; sampling values are
checked once more by SamplingParams, whose InvalidParameterError names the param.

Fields that OpenAI or vLLM clients send but tierlm does not implement are declared too (so the schema
documents them), and UNSUPPORTED says, per field, which values are harmless and what to do instead:
`unsupported_field(body)` names the first field set to anything else, and the server answers 400 with
it as `param`. Implementing a field means deleting its row. Undeclared fields are accepted and ignored,
as vLLM does; `unknown_fields(body)` lists them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Float = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
PromptPolicyName = Literal["reject", "truncate_left", "truncate_middle", "summarize"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


def _not_supported(what: str) -> str:
    return f"not supported yet: {what}"


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")  # undeclared fields are ignored; kept only to be logged

    model: str | None = Field(None, description="the served model's name; omitted means the served model")
    n: int = Field(1, ge=1, le=128)
    temperature: Float | None = Field(None, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    logit_bias: dict[str, Float] | None = Field(None, description=_not_supported("must be empty"))
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}: the '
                          "reply is constrained to it token by token (guided decoding)")
    # accepted OpenAI fields that change nothing here
    store: bool | None = Field(None, description="accepted when false: this server stores no completions")
    metadata: dict[str, str] | None = Field(None, description="accepted and ignored")
    service_tier: str | None = Field(None, description='accepted when "auto" or "default"')
    # vLLM-compatible extensions
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's structured outputs: one constraint per request (response_format included)
    guided_json: str | dict[str, Any] | None = Field(None, description="a JSON schema the reply follows")
    guided_regex: str | None = Field(None, description="a regular expression (Rust syntax) the reply matches")
    guided_choice: list[str] | None = Field(None, description="the reply is one of these strings")
    guided_grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect) the reply follows")
    structured_outputs: dict[str, Any] | None = Field(
        None, description='vLLM\'s form: {"json": SCHEMA} | {"json_object": true} | {"regex": R} | {"choice": [...]} '
                          '| {"grammar": LARK}')
    # vLLM extensions tierlm does not implement yet
    use_beam_search: bool = Field(False, description=_not_supported("must be false"))
    prompt_logprobs: int | None = Field(None, description=_not_supported("must be null"))
    allowed_token_ids: list[int] | None = Field(None, description=_not_supported("must be empty"))
    bad_words: list[str] | None = Field(None, description=_not_supported("must be empty"))
    truncate_prompt_tokens: int | None = Field(None, description=_not_supported(
        "must be null; use tierlm_max_prompt_tokens with tierlm_prompt_policy=truncate_left"))
    return_tokens_as_token_ids: bool | None = Field(None, description=_not_supported("must be false"))
    # tierlm extensions
    tierlm_prompt_policy: PromptPolicyName | None = Field(
        None, description="what to do with a prompt over the context or tierlm_max_prompt_tokens; "
                          "default: the server's --prompt-policy")
    tierlm_max_prompt_tokens: int | None = Field(None, ge=1, le=2**31 - 1,
                                                 description="per-request prompt token budget")


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description=_not_supported("must be false"))
    suffix: str | None = Field(None, description=_not_supported("must be null"))
    best_of: int | None = Field(None, ge=1, le=128, description=_not_supported("must be null or equal n"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    # OpenAI fields tierlm does not implement yet (UNSUPPORTED says which values are accepted)
    tools: list[dict[str, Any]] | None = Field(None, description=_not_supported("must be empty"))
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description=_not_supported('must be "none", or "auto" without tools'))
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored: there are no tool calls")
    functions: list[dict[str, Any]] | None = Field(None, description=_not_supported("must be empty"))
    function_call: Literal["none", "auto"] | dict[str, Any] | None = Field(
        None, description=_not_supported('must be "none", or "auto" without functions'))
    audio: dict[str, Any] | None = Field(None, description=_not_supported("must be null"))
    modalities: list[Literal["text", "audio"]] | None = Field(None, description=_not_supported('must be ["text"]'))
    prediction: dict[str, Any] | None = Field(None, description=_not_supported("must be null"))
    web_search_options: dict[str, Any] | None = Field(None, description=_not_supported("must be null"))
    reasoning_effort: str | None = Field(None, description=_not_supported("must be null"))
    verbosity: str | None = Field(None, description=_not_supported("must be null"))
    # vLLM extensions tierlm does not implement yet
    echo: bool = Field(False, description=_not_supported("must be false"))
    continue_final_message: bool = Field(False, description=_not_supported("must be false"))
    chat_template: str | None = Field(None, description=_not_supported("must be null"))
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=_not_supported("must be empty"))
    documents: list[dict[str, Any]] | None = Field(None, description=_not_supported("must be empty"))


# ---- fields accepted but not implemented -----------------------------------------------------------
@dataclass(frozen=True)
class Unsupported:
    """`harmless(value, body)` is true for the values that change nothing; `fix` tells the user what to do."""

    harmless: Callable[[Any, BaseModel], bool]
    fix: str


_absent = lambda v, b: v is None  # noqa: E731
_empty = lambda v, b: not v  # noqa: E731 - None, false, "", [] or {}

# Field -> rule, for every request model that declares the field; checked in this order.
UNSUPPORTED: dict[str, Unsupported] = {
    "tools": Unsupported(_empty, "remove it (there is no tool calling), or describe the tools in the system "
                                 "message and parse the reply yourself"),
    "tool_choice": Unsupported(lambda v, b: v in (None, "none") or (v == "auto" and not b.tools),
                               'remove it or set "none" (there is no tool calling)'),
    "functions": Unsupported(_empty, "remove it (there is no function calling), or describe the functions in the "
                                     "system message and parse the reply yourself"),
    "function_call": Unsupported(lambda v, b: v in (None, "none") or (v == "auto" and not b.functions),
                                 'remove it or set "none" (there is no function calling)'),
    "audio": Unsupported(_absent, "remove it (replies are text only)"),
    "modalities": Unsupported(lambda v, b: v is None or set(v) <= {"text"},
                              'remove it or set ["text"] (replies are text only)'),
    "prediction": Unsupported(_absent, "remove it (predicted outputs, a decoding speed-up, are not implemented)"),
    "web_search_options": Unsupported(_absent, "remove it (there is no web search)"),
    "reasoning_effort": Unsupported(_absent, "remove it (reasoning is not controlled); bound the reply "
                                             "with max_completion_tokens"),
    "verbosity": Unsupported(_absent, "remove it; ask for a shorter or longer reply in the prompt, "
                                      "or bound it with max_completion_tokens"),
    "service_tier": Unsupported(lambda v, b: v in (None, "auto", "default"), 'remove it or set "auto"'),
    "store": Unsupported(_empty, "remove it or set false (no completions are stored)"),
    "logit_bias": Unsupported(_empty, "remove it or send {}; to end generation at given tokens use "
                                      "stop_token_ids"),
    "echo": Unsupported(_empty, "remove it or set false, and prepend the prompt to the reply yourself"),
    "suffix": Unsupported(_empty, "remove it (fill-in-the-middle is not implemented)"),
    "best_of": Unsupported(lambda v, b: v is None or v == b.n, "remove it or set it equal to n"),
    "continue_final_message": Unsupported(_empty, "remove it or set false"),
    "chat_template": Unsupported(_absent, "remove it (the model's own chat template is used)"),
    "chat_template_kwargs": Unsupported(_empty, "remove it (the model's chat template is rendered with "
                                                "add_generation_prompt only)"),
    "documents": Unsupported(_empty, "remove it and put the documents in a message"),
    "use_beam_search": Unsupported(_empty, "remove it or set false; use temperature=0 for greedy decoding"),
    "prompt_logprobs": Unsupported(_absent, "remove it; only generated tokens get logprobs (logprobs, "
                                            "top_logprobs)"),
    "allowed_token_ids": Unsupported(_empty, "remove it (restricting the vocabulary is not implemented)"),
    "bad_words": Unsupported(_empty, "remove it (banning words is not implemented); to end at a word use stop"),
    "truncate_prompt_tokens": Unsupported(_absent, 'use tierlm_max_prompt_tokens=N with tierlm_prompt_policy='
                                                   '"truncate_left" instead'),
    "return_tokens_as_token_ids": Unsupported(_empty, "remove it or set false"),
}


def structured_outputs(body: BaseModel) -> tuple[dict | None, str | None]:
    """(StructuredOutputsParams fields, the request field they came from) for a body's constraint, or
    (None, None). More than one constraint is an InvalidParameterError naming the second."""
    from tierlm.core.errors import InvalidParameterError

    found: list[tuple[str, dict]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidParameterError('response_format {"type": "json_schema"} has no json_schema.schema',
                                        'send {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                                        param="response_format")
        found.append(("response_format", {"json": rf.json_schema.schema_}))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(body, name, None) is not None:
            found.append((name, {kind: getattr(body, name)}))
    if getattr(body, "structured_outputs", None):
        found.append(("structured_outputs", dict(body.structured_outputs)))
    if len(found) > 1:
        raise InvalidParameterError(f"{found[0][0]} and {found[1][0]} both constrain the reply",
                                    "send one constraint per request", param=found[1][0])
    return (found[0][1], found[0][0]) if found else (None, None)


def _shown(name: str, value: Any) -> str:
    if isinstance(value, (bool, int, float, str)) and len(json.dumps(value)) <= 40:
        return f"{name}={json.dumps(value)}"
    if isinstance(getattr(value, "type", None), str):
        return f'{name} {{"type": {json.dumps(value.type)}}}'
    return name


def unsupported_field(body: BaseModel) -> tuple[str, str] | None:
    """(param, message) for the first field of `body` set to a value this server does not implement."""
    fields = type(body).model_fields
    for name, rule in UNSUPPORTED.items():
        if name in fields:
            value = getattr(body, name)
            if not rule.harmless(value, body):
                return name, f"{_shown(name, value)} is not supported yet by this server (tierlm); {rule.fix}"
    return None


def unknown_fields(body: BaseModel) -> list[str]:
    """The body's undeclared fields (accepted and ignored)."""
    return sorted(body.model_extra or ())
