"""The offline Python API, with vLLM's names: LLM(model=...).generate / .chat / .stream."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from tierlm.config import CacheConfig, DriftGuardConfig, EngineConfig, SchedulerConfig, SparseConfig, TierConfig
from tierlm.core.errors import InvalidParameterError
from tierlm.core.outputs import RequestOutput
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.llm_engine import LLMEngine

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """An engine plus a tokenizer. `LLM()` loads the embedded default model (SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16, kv_cache_memory: int | None = None,
                 num_kv_blocks: int | None = None, enable_prefix_caching: bool = True, hash_seed: int = 0,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, enable_chunked_prefill: bool = True,
                 scheduling_policy: str = "fcfs", attention_backend: str = "auto", tiers: TierConfig | None = None,
                 kv_format: str | None = None, kv_scales: str | None = None,
                 drift_guard: DriftGuardConfig | None = None, sparse: SparseConfig | None = None,
                 quantization: str = "none", quant_group: int | None = None, quant_activations: str = "int16",
                 engram_backend: str = "device", engram_prefetch: str = "auto", enforce_eager: bool = False,
                 cuda_graph_sizes: Sequence[int] = ()):
        cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, memory_bytes=kv_cache_memory,
                            enable_prefix_caching=enable_prefix_caching, hash_seed=hash_seed, kv_format=kv_format,
                            kv_scales_path=kv_scales)
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                enable_chunked_prefill=enable_chunked_prefill, policy=scheduling_policy)
        self._init(LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, max_model_len=max_model_len,
                                          cache=cache, scheduler=sched, attention_backend=attention_backend,
                                          tiers=tiers or TierConfig(),
                                          drift_guard=drift_guard or DriftGuardConfig(),
                                          sparse=sparse or SparseConfig(), quantization=quantization,
                                          quant_group=quant_group, quant_activations=quant_activations,
                                          engram_backend=engram_backend, engram_prefetch=engram_prefetch,
                                          captured_decode="off" if enforce_eager else "auto",
                                          cuda_graph_sizes=tuple(cuda_graph_sizes))))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        return cls.for_engine(LLMEngine(config))

    @classmethod
    def for_engine(cls, engine: LLMEngine) -> "LLM":
        """This API over an engine that already exists (it must have nothing else in flight to `generate`)."""
        llm = cls.__new__(cls)
        llm._init(engine)
        return llm

    def _init(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def close(self) -> None:
        """Persist what the KV tiers hold in memory to disk/Redis and stop their threads (see LLMEngine.close)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, priority: Sequence[int] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                ids.append(self.engine.add_request(p, sp, priority=priority[i] if priority else 0))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | Sequence[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Chat-formatted prompt as token ids (special tokens in the template are parsed as such)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a cumulative RequestOutput after every step that produced tokens for this prompt."""
        rid = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in pending:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [done[rid] for rid in ids]

    @staticmethod
    def _params_list(sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise InvalidParameterError(f"{len(sp)} sampling params for {n} prompts", "pass one per prompt or a single one")
        return sp
