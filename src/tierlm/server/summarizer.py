"""Summarizer: the model summarizes text a prompt policy drops, behind an LRU cache of summaries.

Greedy decoding makes a summary a pure function of the dropped text, so summaries are cached by a
hash of that text: the next turn of the same conversation drops the same messages (the policy drops in
fixed-size groups), gets the same summary back without generating, and so sends the engine the same
token prefix, which the KV prefix cache then reuses. Concurrent requests for one key share one
generation.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib

from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.async_engine import AsyncEngine

SUMMARY_SYSTEM = "You write short, factual summaries of conversations and documents."
SUMMARY_ASK = "Summarize the following text in two or three sentences. Keep names, numbers and decisions.\n\n"


class Summarizer:
    def __init__(self, aengine: AsyncEngine, max_tokens: int = 96, capacity: int = 256):
        self.aengine = aengine
        self.tokenizer = aengine.engine.tokenizer
        self.max_model_len = aengine.engine.max_model_len
        self.max_tokens = max_tokens
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    async def summarize(self, text: str) -> tuple[str, bool]:
        """(summary, cache_hit). A request waiting on another's generation of the same key is a hit."""
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            return self._cache[key], True
        if key in self._inflight:
            self.hits += 1
            return await asyncio.shield(self._inflight[key]), True
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            summary = await self._generate(text)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters (if any) still see it
            raise
        finally:
            self._inflight.pop(key, None)
        if not fut.done():
            fut.set_result(summary)
        self._cache[key] = summary
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return summary, False

    def _prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        overhead = len(self._render("")) + self.max_tokens + 8
        room = max(16, self.max_model_len - overhead)
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) > room:  # keep the most recent part of what was dropped
            text = tok.decode(ids[-room:])
        return self._render(text)

    def _render(self, text: str) -> list[int]:
        messages = [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": SUMMARY_ASK + text}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    async def _generate(self, text: str) -> str:
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
        stream = await self.aengine.add_request(self._prompt(text), params)
        out = None
        try:
            async for out in stream:
                pass
        finally:
            stream.abort()
        summary = out.outputs[0].text.strip() if out is not None else ""
        return summary or "(nothing to summarize)"
