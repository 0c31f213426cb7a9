"""HFDirectory: a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) loaded as a
LoadedCheckpoint. Also reads tierlm's converted-GGUF cache entries, which use the same layout."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from tierlm.core.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from tierlm.models.loader.checkpoint import LoadedCheckpoint
from tierlm.models.loader.config_json import model_config_from_hf
from tierlm.models.loader.fp8_checkpoint import SCALE_SUFFIX, block_size, split_fp8
from tierlm.models.loader.manifest import weights_digest
from tierlm.models.loader.tokenizer import Tokenizer
from tierlm.models.loader.weight_layout import check_weights, expected_weight_shapes

INDEX_FILE = "model.safetensors.index.json"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_json(path: Path, fix: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"cannot read {path}: {exc}", fix) from exc
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path} is not a JSON object", fix)
    return data


def read_safetensors(path: Path, names: set[str] | None = None, fix: str = "re-download the weights") -> dict:
    """Tensors of one .safetensors file (memory-mapped; only `names` when given)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if names is None or k in names]
            return {k: f.get_tensor(k) for k in keys}
    except FileNotFoundError as exc:
        raise CorruptModelError(f"weight file {path} is missing", fix) from exc
    except Exception as exc:  # SafetensorError (bad header, truncated data), OSError
        raise CorruptModelError(f"{path} is truncated or corrupt: {_first_line(exc)}", fix) from exc


class HFDirectory:
    """A model directory in Hugging Face layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fix = f"re-download the model into {self.path}"
        if not (self.path / "config.json").is_file():
            raise ModelNotFoundError(f"{self.path} has no config.json, so it is not a model directory",
                                     "point --model at a Hugging Face model directory, a .gguf file, or 'default'")

    def weight_files(self) -> list[Path]:
        single = self.path / "model.safetensors"
        if single.exists():
            return [single]
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = read_json(index, self.fix).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptModelError(f"{index} has no weight_map", self.fix)
            return [self.path / name for name in dict.fromkeys(weight_map.values())]
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        if any(self.path.glob("pytorch_model*.bin")) or any(self.path.glob("*.pt")):
            raise UnsupportedModelError(f"{self.path} has PyTorch .bin weights only",
                                        "convert them to safetensors (save_pretrained(..., safe_serialization=True))")
        raise CorruptModelError(f"{self.path} has no *.safetensors weights", self.fix)

    def load(self, *, source: str = "hf", model_id: str | None = None, origin: Path | None = None,
             file_digests: dict[str, str] | None = None) -> LoadedCheckpoint:
        """The checkpoint. file_digests: known xxh3_128 digests by file name (a verified cache manifest);
        weight files not in it are hashed here for `weights_digest`."""
        cfg = read_json(self.path / "config.json", self.fix)
        gen_path = self.path / "generation_config.json"
        gen_eos: list[int] = []
        if gen_path.exists():
            value = read_json(gen_path, self.fix).get("eos_token_id")
            gen_eos = [int(v) for v in (value if isinstance(value, list) else [value] if value is not None else [])]
        # Architecture first: an unsupported model says so before any tokenizer or weight error.
        config = model_config_from_hf(cfg, where=str(self.path / "config.json"),
                                      model_id=model_id or self.path.name, extra_eos_token_ids=gen_eos)
        tokenizer = self.tokenizer()
        eos = list(config.eos_token_ids) + list(tokenizer.eos_token_ids)
        bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
        config = dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(eos)), bos_token_id=bos)
        tokenizer = tokenizer.with_eos_token_ids(config.eos_token_ids)
        fp8_block = block_size(cfg.get("quantization_config"), str(self.path / "config.json"))
        weights, config, fp8_stored = self.weights(config, tie_explicit="tie_word_embeddings" in cfg,
                                                   fp8_block=fp8_block)
        if tokenizer.vocab_size > config.vocab_size:
            raise CorruptModelError(f"{self.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                                    f"only {config.vocab_size} embeddings", "use the tokenizer saved with this model")
        extra_files = []
        if config.engram is not None:
            extra_files = self.engram_files(config, weights)
        digest = weights_digest(list(dict.fromkeys(self.weight_files() + extra_files)), known=file_digests)
        return LoadedCheckpoint(config=config, weights=weights, tokenizer=tokenizer, path=self.path,
                                source=source, weights_digest=digest, origin=origin or self.path,
                                fp8_stored=fp8_stored, table_files=tuple(extra_files))

    def engram_files(self, config, weights: dict) -> list[Path]:
        """A V4-mini's Engram tables (memory-mapped from engram.safetensors, models/v4mini.py) and token map, into
        `weights`; the files, for the weights digest (KV computed with other tables is other KV)."""
        from tierlm.memory.hashing import layer_hasher, load_map
        from tierlm.memory.storage import EngramTable
        from tierlm.models.v4mini import TOKEN_MAP, table_name

        e, path = config.engram, self.path / "engram.safetensors"
        for i in e.layers:
            shape = (layer_hasher(e, i, config.vocab_size).total_rows, e.row_dim)
            weights[table_name(i)] = EngramTable.from_safetensors(path, table_name(i), "mmap", shape=shape).data
        if e.num_ids:
            weights[TOKEN_MAP] = load_map(self.path / "engram_map.json", config.vocab_size)
        return [path]

    def tokenizer(self) -> Tokenizer:
        tok_json = self.path / "tokenizer.json"
        if not tok_json.exists():
            raise UnsupportedModelError(f"{self.path} has no tokenizer.json (slow tokenizers are not supported)",
                                        "save a fast tokenizer there: AutoTokenizer.from_pretrained(dir)"
                                        ".save_pretrained(dir)")
        return Tokenizer.from_file(tok_json, self.path / "tokenizer_config.json")

    def weights(self, config, tie_explicit: bool = True,
                fp8_block: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], object, dict]:
        """(weights filtered to the config's layout, config with tie_word_embeddings settled, the FP8 weights as
        stored: loader/fp8_checkpoint.py)."""
        wanted = set(expected_weight_shapes(dataclasses.replace(config, tie_word_embeddings=False)))
        wanted |= {n + SCALE_SUFFIX for n in wanted}
        weights: dict[str, torch.Tensor] = {}
        for file in self.weight_files():
            weights.update(read_safetensors(file, wanted, self.fix))
        weights, fp8_stored = split_fp8(weights, fp8_block, str(self.path))
        if not config.tie_word_embeddings and "lm_head.weight" not in weights and not tie_explicit:
            config = dataclasses.replace(config, tie_word_embeddings=True)  # no head stored: it is the embedding
        if config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        check_weights(weights, config, str(self.path), self.fix)
        return weights, config, {n: s for n, s in fp8_stored.items() if n in weights}
