"""CompletionServing: POST /v1/completions (legacy text completions), streamed or not."""
from __future__ import annotations

from fastapi import Request

from tierlm.server.errors import APIError
from tierlm.server.protocol import CompletionRequest
from tierlm.server.serving import Job, Serving


class CompletionServing(Serving):
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    async def create(self, request: Request, body: CompletionRequest):
        self.check_fields(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and any(t >= self.engine.model_config.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be below the vocabulary size "
                                f"{self.engine.model_config.vocab_size}", param="prompt")
        self.check_model(body.model)
        params = self.sampling_params(body, body.max_tokens, body.logprobs)

        async def prepare():
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            return await self.fit(ids, body, body.max_tokens), params

        return await self.serve(request, body, prepare)

    def logprobs(self, c, start: int, end: int, text_offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = text_offset
        for entry in (c.logprobs or [])[start:end]:
            text = self.token_text(entry[0].token_id)
            tokens.append(text)
            lps.append(entry[0].logprob)
            tops.append({self.token_text(e.token_id): e.logprob for e in entry[1:]})
            offsets.append(pos)
            pos += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def stream_choice(self, index: int, delta: str, logprobs, c) -> dict:
        return {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def response(self, job: Job, final) -> dict:
        want = job.params.logprobs is not None
        choices = [{"index": c.index, "text": c.text,
                    "logprobs": self.logprobs(c, 0, len(c.token_ids), 0) if want else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in final.outputs]
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": self.config.model_name,
                "choices": choices, "usage": self.usage(job, final), "tierlm": job.fitted.info()}
