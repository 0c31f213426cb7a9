"""Verbatim leakage of a reference corpus (a book, a training set) into generated samples.

Text is compared as words: case-folded `\\w+` tokens, so case and punctuation never matter
("And God said, Let there be light" and "and god said let there be light" are the same six
words). The normalised form of a text is its words joined by single spaces; reported matches are
in that form.

For each sample the scan reports
- `ngram_overlap`: the fraction of its word n-grams (default n = 8, counted with repeats) that
  occur anywhere in the corpus (0.0 for a sample of fewer than n words);
- its longest verbatim match: the longest run of consecutive words that occurs in the corpus.

The index is a sorted numpy array of 64-bit n-gram hashes (xxh64 per word, combined
polynomially). A hash miss is definitive; a hit only nominates candidates: runs of consecutive
hits span words that might occur in the corpus as one passage, so each candidate is checked with
an exact substring search of the normalised corpus and shrunk until it really occurs. Matches
are therefore exact, never hash collisions, and never shorter than n words (shorter overlaps are
not reported). Documents (files, list items) are indexed separately: no n-gram spans two of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from tierlm.core.errors import InvalidParameterError

CORPUS_SUFFIXES = (".txt", ".md")
_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio)
_CHUNK_CHARS = 1 << 20  # a corpus document is tokenised in pieces of about this size


@dataclass
class LeakageMatch:
    """The longest verbatim copy in one sample: `words` words, `text` in normalised form."""

    sample: int
    words: int
    text: str


@dataclass
class LeakageReport:
    """Per-sample n-gram overlap with the corpus, and the longest verbatim copies."""

    samples: int
    n: int
    ngram_overlap: list[float] = field(repr=False)
    match_words: list[int] = field(repr=False)  # per sample: words in its longest match (0: none)
    mean_overlap: float
    samples_with_match: int
    longest: list[LeakageMatch]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form of the whole report."""
        return {
            "samples": self.samples, "n": self.n, "mean_overlap": self.mean_overlap,
            "samples_with_match": self.samples_with_match,
            "longest": [asdict(m) for m in self.longest],
            "ngram_overlap": list(self.ngram_overlap), "match_words": list(self.match_words),
        }


def words_of(text: str) -> list[str]:
    """The case-folded `\\w+` words of `text`."""
    return _WORD.findall(text.casefold())


def _pieces(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """`text` cut into pieces of about `size` characters, never inside a `\\w+` word."""
    start = 0
    while start < len(text):
        cut = start + size
        if cut < len(text):
            while cut > start and _WORD.fullmatch(text, cut - 1, cut + 1):  # a word goes on across cut
                cut -= 1
            if cut == start:  # one word longer than `size`: cut after it
                cut = _WORD.match(text, start).end()
        yield text[start:cut]
        start = cut


class _WordHasher:
    """xxh64 of words, memoised (a corpus repeats a small vocabulary)."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, words: list[str]) -> np.ndarray:
        cache = self._cache
        for w in words:
            if w not in cache:
                cache[w] = xxhash.xxh64_intdigest(w.encode())
        return np.fromiter((cache[w] for w in words), dtype=np.uint64, count=len(words))


def _ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of n consecutive words (len(words) - n + 1 of them, or none)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = word_hashes[:count].copy()
    for k in range(1, n):
        h = h * _MULTIPLIER + word_hashes[k:k + count]  # wraps modulo 2**64
    return h


def _runs(hits: np.ndarray) -> list[tuple[int, int]]:
    """(first, last + 1) of each run of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], hits.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


class LeakageIndex:
    """Word n-gram index of a reference corpus (one text, or a list of documents)."""

    def __init__(self, corpus: str | list[str], n: int = 8):
        if n < 1:
            raise InvalidParameterError(f"leakage n-gram length {n} is below 1", "pass n >= 1", param="n")
        self.n = n
        self._hash_words = _WordHasher()
        documents = [corpus] if isinstance(corpus, str) else corpus
        normalised, hashes = [], []
        for doc in documents:
            text, doc_hashes = self._index_document(doc)
            normalised.append(text)
            hashes.append(doc_hashes)
        self._hashes = np.unique(np.concatenate(hashes)) if hashes else np.empty(0, dtype=np.uint64)
        if not len(self._hashes):
            raise InvalidParameterError(f"the reference corpus has no passage of {n} words",
                                        "give a longer corpus or a smaller n", param="corpus")
        # Each document as " w1 w2 ... ", documents separated by "\n": searching for " span " then
        # finds whole words only, and never across two documents.
        self._text = "\n".join(normalised)

    @classmethod
    def from_paths(cls, paths: list[str | Path], n: int = 8) -> LeakageIndex:
        """Index the files in `paths` (files, or directories searched recursively for *.txt and
        *.md), one document per file."""
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES)
            elif p.is_file():
                files.append(p)
            else:
                raise InvalidParameterError(f"reference corpus path {p} does not exist",
                                            "pass existing files or directories", param="corpus")
        if not files:
            raise InvalidParameterError(f"no {' or '.join(CORPUS_SUFFIXES)} files under {', '.join(map(str, paths))}",
                                        "pass the reference corpus as text files or directories of them",
                                        param="corpus")
        return cls([f.read_text(encoding="utf-8", errors="replace") for f in files], n=n)

    def _index_document(self, doc: str) -> tuple[str, np.ndarray]:
        """(the document's normalised text padded with spaces, its n-gram hashes)."""
        texts, word_hashes = [], []
        for piece in _pieces(doc):
            words = words_of(piece)
            texts.append(" ".join(words))
            word_hashes.append(self._hash_words(words))
        text = " ".join(t for t in texts if t)
        return f" {text} ", _ngram_hashes(np.concatenate([np.empty(0, np.uint64), *word_hashes]), self.n)

    def _occurs(self, words: list[str]) -> bool:
        return f" {' '.join(words)} " in self._text

    def _longest_in_run(self, words: list[str]) -> list[str]:
        """Longest stretch of `words` (a run of n-gram hits) that occurs in the corpus; empty if
        none of n words or more does.

        A whole run usually is one copied passage: one search. Otherwise two pointers: any part
        of a stretch that occurs also occurs, so once the longest stretch from `start` ends at
        `end`, later starts only need to try ends past `end`."""
        if self._occurs(words):
            return words
        best, end = (0, 0), 0
        for start in range(len(words) - self.n + 1):
            end = max(end, start + self.n - 1)  # words[start:end] occurs whenever end - start >= n
            while end < len(words) and self._occurs(words[start:end + 1]):
                end += 1
            if end - start > best[1] - best[0]:
                best = (start, end)
        return words[best[0]:best[1]] if best[1] - best[0] >= self.n else []

    def _scan_one(self, text: str) -> tuple[float, list[str]]:
        """(n-gram overlap, longest verbatim match as words) of one sample."""
        words = words_of(text)
        grams = _ngram_hashes(self._hash_words(words), self.n)
        if not len(grams):
            return 0.0, []
        pos = np.minimum(np.searchsorted(self._hashes, grams), len(self._hashes) - 1)
        hits = self._hashes[pos] == grams
        longest: list[str] = []
        for first, last in sorted(_runs(hits), key=lambda r: r[0] - r[1]):  # longest run first
            if last - first + self.n - 1 <= len(longest):
                break
            match = self._longest_in_run(words[first:last + self.n - 1])
            if len(match) > len(longest):
                longest = match
        return float(hits.mean()), longest

    def scan(self, texts: list[str], top: int = 10) -> LeakageReport:
        """Overlap and longest match of every sample; `top` longest matches across samples."""
        if top < 0:
            raise InvalidParameterError(f"top={top} is negative", "pass top >= 0", param="top")
        overlaps, matches = [], []
        for i, text in enumerate(texts):
            overlap, longest = self._scan_one(text)
            overlaps.append(overlap)
            matches.append(LeakageMatch(sample=i, words=len(longest), text=" ".join(longest)))
        found = sorted((m for m in matches if m.words), key=lambda m: (-m.words, m.sample))
        return LeakageReport(
            samples=len(texts), n=self.n, ngram_overlap=overlaps, match_words=[m.words for m in matches],
            mean_overlap=float(np.mean(overlaps)) if overlaps else 0.0,
            samples_with_match=len(found), longest=found[:top])
