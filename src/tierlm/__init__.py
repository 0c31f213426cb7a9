"""tierlm: an LLM inference engine built around the memory hierarchy."""
from tierlm.core import RequestOutput, SamplingParams, StructuredOutputsParams, TierlmError

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import tierlm` stays cheap (no torch import) until the engine is needed.
    if name in ("LLM", "LLMEngine"):
        import tierlm.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tierlm' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "TierlmError", "__version__"]
