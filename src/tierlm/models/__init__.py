"""Model definitions (models/llama.py ...) and loaders (models/loader/)."""
from tierlm.models.registry import build_model

__all__ = ["build_model"]
