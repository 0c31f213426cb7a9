"""The engine: LLMEngine (add_request / step), the model runner, the sampler, and the LLM API."""
from tierlm.engine.llm import LLM
from tierlm.engine.llm_engine import LLMEngine

__all__ = ["LLM", "LLMEngine"]
