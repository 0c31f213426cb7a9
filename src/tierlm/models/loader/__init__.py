"""The model loader: `load_checkpoint(model)` turns a model reference into config + weights + tokenizer.

model: None / "default" (the embedded SmolLM2-135M-Instruct GGUF), a path to a .gguf file (converted
once into the cache, then read from there), or a Hugging Face model directory (config.json,
*.safetensors, tokenizer.json). Bad input raises ModelNotFoundError / CorruptModelError /
UnsupportedModelError with one line naming the problem and the fix.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tierlm.core.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from tierlm.models.loader.cache import ModelCache, cache_root
from tierlm.models.loader.checkpoint import LoadedCheckpoint
from tierlm.models.loader.default_model import DEFAULT_MODEL_ID, DEFAULT_MODEL_NAMES, default_gguf_path
from tierlm.models.loader.gguf_conversion import CONVERTER_VERSION, convert_gguf
from tierlm.models.loader.hf import HFDirectory
from tierlm.models.loader.manifest import manifest_digests, read_manifest
from tierlm.models.loader.tokenizer import Tokenizer

__all__ = ["LoadedCheckpoint", "Tokenizer", "load_checkpoint", "resolve_model_path", "cache_root"]
log = logging.getLogger(__name__)
_USAGE = "pass a .gguf file, a Hugging Face model directory, or 'default'"


def resolve_model_path(model: str | Path | None) -> Path:
    """The file or directory `model` names. ModelNotFoundError when there is none."""
    if model in DEFAULT_MODEL_NAMES:
        return default_gguf_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise ModelNotFoundError(f"model {str(model)!r} not found: no such file or directory", _USAGE)


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _load_gguf(path: Path, model_id: str | None) -> LoadedCheckpoint:
    cache = ModelCache()
    entry = cache.entry_for(path, salt=f"v{CONVERTER_VERSION}")
    if entry.is_dir():
        try:
            manifest = cache.verify(entry)  # re-hashes every file: bit rot inside the tensor data shows here
            return HFDirectory(entry).load(source="gguf-cache", origin=path, file_digests=manifest_digests(manifest))
        except (CorruptModelError, ModelNotFoundError, UnsupportedModelError) as exc:
            log.warning("cached copy %s is unusable (%s); rebuilding it", entry, exc)
            cache.discard(entry)
    log.info("converting %s into %s (once)", path, entry)
    cache.build(entry, lambda tmp: convert_gguf(path, tmp, model_id))
    # Just written and hashed (or another process's fresh copy): the manifest is trusted without a re-hash.
    manifest = read_manifest(entry, fix=f"delete {entry} and load the model again to rebuild it")
    return HFDirectory(entry).load(source="gguf-cache", origin=path, file_digests=manifest_digests(manifest))


def load_checkpoint(model: str | Path | None = None) -> LoadedCheckpoint:
    """Load config, weights (memory-mapped, Hugging Face names) and tokenizer for `model`."""
    path = resolve_model_path(model)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return _load_gguf(ggufs[0], None)
        return HFDirectory(path).load(source="hf")
    if _is_gguf(path):
        model_id = DEFAULT_MODEL_ID if model in DEFAULT_MODEL_NAMES else None
        return _load_gguf(path, model_id)
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise UnsupportedModelError(f"{path} is one file of a model directory", f"pass its directory {path.parent}")
    raise UnsupportedModelError(f"{path} is neither a GGUF file nor a model directory", _USAGE)
