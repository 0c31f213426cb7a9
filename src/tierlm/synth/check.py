"""Does a generated text satisfy its job's constraint? (ok, reason) per sample, independent of the grammar library
that guided its decoding: JSON parsed and validated with `jsonschema`, regexes matched with Python's `re` (the
common subset of Rust's syntax), choices compared exactly. A sample cut by max_tokens is rejected as truncated."""
from __future__ import annotations

import json
import re

from tierlm.core.sampling_params import StructuredOutputsParams


class Checker:
    def __init__(self, constraint: StructuredOutputsParams | None):
        self.constraint = constraint
        self._validator = None
        self._regex = None
        if constraint is None:
            return
        if constraint.kind == "json":
            import jsonschema

            schema = constraint.json if isinstance(constraint.json, dict) else json.loads(constraint.json)
            cls = jsonschema.validators.validator_for(schema)
            self._validator = cls(schema)
        elif constraint.kind == "regex":
            try:
                self._regex = re.compile(constraint.regex)
            except re.error:
                self._regex = None  # Rust-only syntax: the guided decoding was the check

    def check(self, text: str, finish_reason: str | None) -> str | None:
        """None when the sample is valid, else the reason it is not (one short line)."""
        if finish_reason == "length":
            return "truncated at max_tokens"
        if finish_reason not in (None, "stop"):
            return f"finished by {finish_reason}"
        c = self.constraint
        if c is None:
            return None if text.strip() else "empty"
        if c.kind in ("json", "json_object"):
            try:
                value = json.loads(text)
            except ValueError as e:
                return f"invalid JSON: {e.msg}"
            if c.kind == "json_object":
                return None if isinstance(value, dict) else f"JSON {type(value).__name__}, not an object"
            err = next(iter(self._validator.iter_errors(value)), None)
            if err is None:
                return None
            where = "/".join(str(p) for p in err.absolute_path)
            return f"schema: {err.message[:120]}" + (f" at {where}" if where else "")
        if c.kind == "regex":
            if self._regex is not None and not self._regex.fullmatch(text):
                return "does not match the regex"
            return None
        if c.kind == "choice":
            return None if text in c.choice else "not one of the choices"
        return None  # a Lark grammar: only the library that guided decoding can check it


def reason_kind(reason: str | None) -> str:
    """A reject reason's family for counting: 'invalid JSON: Expecting ...' -> 'invalid JSON'."""
    if reason is None:
        return "accepted"
    for sep in (":", " of ", " ("):
        if sep in reason:
            return reason.split(sep, 1)[0]
    return reason
