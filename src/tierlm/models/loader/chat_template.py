"""ChatTemplate: a model's Jinja chat template, rendered the way Hugging Face renders it.

Same environment as transformers' `apply_chat_template`: a sandboxed, immutable Jinja environment with
trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson` filter that keeps non-ASCII,
and the `raise_exception` / `strftime_now` globals that templates call.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from tierlm.core.errors import CorruptModelError, InvalidParameterError


def _raise_exception(message: str) -> None:
    raise InvalidParameterError(f"the chat template rejected the messages: {message}",
                                "fix the conversation (roles, order, content) to fit the model's chat format")


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled chat template. Compiled on first use so a broken template never blocks loading."""

    def __init__(self, source: str):
        self.source = source
        self._compiled = None

    def _template(self):
        if self._compiled is None:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = env.from_string(self.source)
            except jinja2.TemplateError as exc:
                raise CorruptModelError(f"the model's chat template does not compile: {exc}",
                                        "fix chat_template in tokenizer_config.json or use a plain prompt") from exc
        return self._compiled

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidParameterError("messages must be a list of {'role': ..., 'content': ...} dicts",
                                        "pass a list of message dicts", param="messages")
        import jinja2

        try:
            return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **variables)
        except InvalidParameterError:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidParameterError(f"the chat template failed on these messages: {exc}",
                                        "check the messages' roles and content types", param="messages") from exc
