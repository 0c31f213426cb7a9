"""Prompt policies: what to do with a prompt over the context or over a per-request token budget.

The server calls a policy only when the prompt does not fit, with `limit` = the most prompt tokens
allowed (context minus the tokens reserved for generation, capped by tierlm_max_prompt_tokens):

    reject           400 "maximum context length is N tokens" (the default).
    truncate_left    keep the last `limit` tokens. Simple, but every turn shifts the start of the
                     prompt, so the prefix cache never hits (the system prompt is cut too).
    truncate_middle  chat: keep the leading system messages and the most recent turns, dropping whole
                     messages from the middle, oldest first, in groups of DROP_GROUP messages, so that
                     consecutive turns drop the same messages and keep the same token prefix (prefix-
                     cache hits); text, or a chat whose last message alone is too long: keep the head
                     and the tail tokens.
    summarize        like truncate_middle, but the model summarizes what is dropped and the summary is
                     appended to the system prompt; summaries are cached (Summarizer), so later turns
                     reuse both the summary and its KV.

Chat prompts are token ids of the rendered chat template; `render(messages)` renders and encodes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tierlm.server.errors import APIError
from tierlm.server.summarizer import Summarizer

DROP_GROUP = 4  # messages dropped at a time: two user/assistant turns
SYSTEM_ROLES = ("system", "developer")

Message = dict[str, str]
Render = Callable[..., list[int]]  # render(messages, add_generation_prompt=True) -> token ids


@dataclass
class FittedPrompt:
    token_ids: list[int]
    policy: str  # the policy that changed the prompt; "none" when it fit as sent
    original_tokens: int
    dropped_messages: int = 0
    summary_cache_hit: bool | None = None

    def info(self) -> dict:
        d = {"prompt_policy": self.policy, "prompt_tokens_original": self.original_tokens,
             "prompt_tokens_dropped": max(0, self.original_tokens - len(self.token_ids))}
        if self.dropped_messages:
            d["dropped_messages"] = self.dropped_messages
        if self.summary_cache_hit is not None:
            d["summary_cache_hit"] = self.summary_cache_hit
        return d


@dataclass
class PolicyInput:
    """One over-long prompt: its token ids, and its messages when it came from the chat endpoint."""

    token_ids: list[int]
    limit: int
    overflow: APIError  # what `reject` raises
    messages: list[Message] | None = None
    render: Render | None = None


class PromptPolicy:
    """Base: `fit` returns a prompt of at most `limit` tokens, or raises APIError."""

    name = "base"

    async def fit(self, p: PolicyInput) -> FittedPrompt:
        raise NotImplementedError


class Reject(PromptPolicy):
    name = "reject"

    async def fit(self, p: PolicyInput) -> FittedPrompt:
        raise p.overflow


class TruncateLeft(PromptPolicy):
    name = "truncate_left"

    async def fit(self, p: PolicyInput) -> FittedPrompt:
        return FittedPrompt(p.token_ids[-p.limit:], self.name, len(p.token_ids))


def keep_head_tail(ids: list[int], limit: int, head: int) -> list[int]:
    """ids[:head] + the last (limit - head) tokens:  | head | ...dropped... | tail |"""
    head = max(0, min(head, limit // 2))
    tail = limit - head
    return ids[:head] + (ids[-tail:] if tail else [])


def split_system(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    i = 0
    while i < len(messages) and messages[i]["role"] in SYSTEM_ROLES:
        i += 1
    return messages[:i], messages[i:]


def drop_counts(num_rest: int) -> list[int]:
    """How many of the oldest non-system messages to try dropping, in order; the last one always stays."""
    counts = list(range(DROP_GROUP, num_rest, DROP_GROUP))
    if num_rest > 1 and (not counts or counts[-1] != num_rest - 1):
        counts.append(num_rest - 1)
    return counts


def system_head(p: PolicyInput, system: list[Message]) -> int:
    """Tokens of the rendered system messages when they are a prefix of the prompt, else half the limit."""
    if not system or p.render is None:
        return p.limit // 2
    sys_ids = p.render(system, False)
    return len(sys_ids) if p.token_ids[:len(sys_ids)] == sys_ids else p.limit // 2


class TruncateMiddle(PromptPolicy):
    name = "truncate_middle"

    async def fit(self, p: PolicyInput) -> FittedPrompt:
        n0 = len(p.token_ids)
        if p.messages is not None and p.render is not None:
            system, rest = split_system(p.messages)
            for k in drop_counts(len(rest)):
                ids = p.render(system + rest[k:])
                if len(ids) <= p.limit:
                    return FittedPrompt(ids, self.name, n0, dropped_messages=k)
            return FittedPrompt(keep_head_tail(p.token_ids, p.limit, system_head(p, system)), self.name, n0)
        return FittedPrompt(keep_head_tail(p.token_ids, p.limit, p.limit // 2), self.name, n0)


class Summarize(PromptPolicy):
    name = "summarize"

    def __init__(self, summarizer: Summarizer):
        self.summarizer = summarizer
        self.allowance = summarizer.max_tokens + 24  # room kept for the summary and its framing

    async def fit(self, p: PolicyInput) -> FittedPrompt:
        if p.messages is not None and p.render is not None:
            return await self._fit_chat(p)
        return await self._fit_text(p)

    async def _fit_chat(self, p: PolicyInput) -> FittedPrompt:
        n0 = len(p.token_ids)
        system, rest = split_system(p.messages)
        for k in drop_counts(len(rest)):
            if len(p.render(system + rest[k:])) + self.allowance > p.limit:
                continue
            transcript = "\n".join(f"{m['role']}: {m['content']}" for m in rest[:k])
            summary, hit = await self.summarizer.summarize(transcript)
            note = f"Summary of the earlier conversation: {summary}"
            if system:
                merged = [dict(system[0], content=system[0]["content"] + "\n\n" + note)] + system[1:]
            else:
                merged = [{"role": "system", "content": note}]
            ids = p.render(merged + rest[k:])
            if len(ids) > p.limit:
                ids = keep_head_tail(ids, p.limit, p.limit // 2)
            return FittedPrompt(ids, self.name, n0, dropped_messages=k, summary_cache_hit=hit)
        return await TruncateMiddle().fit(p)

    async def _fit_text(self, p: PolicyInput) -> FittedPrompt:
        ids, limit = p.token_ids, p.limit
        if limit <= 2 * self.allowance:
            return await TruncateMiddle().fit(p)
        tok = self.summarizer.tokenizer
        head = limit // 4
        tail = limit - head - self.allowance
        summary, hit = await self.summarizer.summarize(tok.decode(ids[head:len(ids) - tail]))
        mid = tok.encode(f"\n[Summary of omitted text: {summary}]\n", add_special_tokens=False)
        mid = mid[: limit - head - tail]
        return FittedPrompt(ids[:head] + mid + ids[-tail:], self.name, len(ids), summary_cache_hit=hit)


def build_policies(summarizer: Summarizer) -> dict[str, PromptPolicy]:
    return {"reject": Reject(), "truncate_left": TruncateLeft(), "truncate_middle": TruncateMiddle(),
            "summarize": Summarize(summarizer)}
