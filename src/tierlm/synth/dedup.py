"""Exact and near-duplicate removal over a job's accepted samples, in job order (so a resumed job makes the same
decisions): exact = the same text after case folding and whitespace collapsing; near = MinHash (datasketch) over
word shingles, an LSH index at the job's Jaccard threshold, the estimated Jaccard confirmed against the match."""
from __future__ import annotations

import hashlib
import re

from tierlm.synth.job import Dedup

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


class Deduplicator:
    def __init__(self, spec: Dedup):
        self.spec = spec
        self._exact: dict[str, str] = {}
        self._lsh = None
        self._hashes: dict[str, object] = {}
        if spec.near_threshold is not None:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=spec.near_threshold, num_perm=spec.num_perm)

    def _minhash(self, text: str):
        from datasketch import MinHash

        words = _WORD.findall(text.casefold())
        k = self.spec.shingle
        shingles = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))} if words else {text}
        m = MinHash(num_perm=self.spec.num_perm, seed=1)
        m.update_batch([s.encode() for s in shingles])
        return m

    def check(self, sample_id: str, text: str) -> str | None:
        """None when `text` is new (and it is remembered), else why it is a duplicate."""
        key = hashlib.sha256(normalize(text).encode()).hexdigest()
        if self.spec.exact and key in self._exact:
            return f"duplicate of {self._exact[key]}"
        m = self._minhash(text) if self._lsh is not None else None
        if m is not None:
            best = None
            for other in self._lsh.query(m):
                j = m.jaccard(self._hashes[other])
                if j >= self.spec.near_threshold and (best is None or j > best[1]):
                    best = (other, j)
            if best is not None:
                return f"near-duplicate of {best[0]} (Jaccard {best[1]:.2f})"
        self._exact.setdefault(key, sample_id)
        if m is not None:
            self._lsh.insert(sample_id, m)
            self._hashes[sample_id] = m
        return None
