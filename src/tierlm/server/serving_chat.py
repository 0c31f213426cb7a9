"""ChatServing: POST /v1/chat/completions with the model's chat template, streamed or not."""
from __future__ import annotations

from fastapi import Request

from tierlm.server.errors import APIError
from tierlm.server.protocol import ChatCompletionRequest
from tierlm.server.serving import Job, Serving, _event


class ChatServing(Serving):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    async def create(self, request: Request, body: ChatCompletionRequest):
        self.check_fields(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        self.check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        tok = self.tokenizer

        def render(msgs: list[dict], add_generation_prompt: bool = True) -> list[int]:
            text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt and
                                           body.add_generation_prompt)
            return tok.encode(text, add_special_tokens=False)

        async def prepare():
            try:
                ids = render(messages)
            except APIError:
                raise
            except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is a 400
                if isinstance(e, ValueError) or type(e).__module__.startswith("jinja2"):
                    raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
                raise
            return await self.fit(ids, body, max_tokens, messages, render), params

        return await self.serve(request, body, prepare)

    def _entry(self, lp) -> dict:
        text = self.token_text(lp.token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}

    def logprobs(self, c, start: int, end: int, text_offset: int) -> dict:
        content = []
        for entry in (c.logprobs or [])[start:end]:
            item = self._entry(entry[0])
            item["top_logprobs"] = [self._entry(e) for e in entry[1:]]
            content.append(item)
        return {"content": content}

    def first_chunk(self, job: Job) -> str:
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(job.params.n)]
        return "".join(_event(self._chunk_base(job, [ch], extra=(ch["index"] == 0))) for ch in choices)

    def new_stream_state(self, job: Job) -> dict:
        state = super().new_stream_state(job)
        state["sent_info"] = True  # the role chunk carried it
        return state

    def stream_choice(self, index: int, delta: str, logprobs, c) -> dict:
        d = {"content": delta} if delta else {}
        return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def response(self, job: Job, final) -> dict:
        want = job.params.logprobs is not None
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c, 0, len(c.token_ids), 0) if want else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in final.outputs]
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": self.config.model_name,
                "choices": choices, "usage": self.usage(job, final), "tierlm": job.fitted.info()}
