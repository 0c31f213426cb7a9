"""The curriculum as data: stages (token budget, sequence length, corpus mixture) and competence-based ordering.

Each corpus's training documents are one stream ordered easy to hard by the configured difficulty
(train/data.py). A sequence is a window of the stream starting in its first `competence` share: competence
grows within a stage from `start_competence` to 1 along sqrt(t (1 - c0^2) + c0^2) (Platanios et al., 2019,
"Competence-based curriculum learning"), or stays where a stage fixes it (1.0 is uniform sampling). The
corpus of each sequence is drawn by the stage's mixture weights. Stages run in order: a short-sequence warm-up,
the main stage, and a final context-extension stage at the longest length.

A step's batch depends on (seed, step) alone, so a resumed run sees exactly the batches it would have seen, and
data-parallel ranks take disjoint rows of the same global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tierlm.core.errors import InvalidParameterError
from tierlm.train.config import CurriculumSpec, StageSpec
from tierlm.train.data import Stream


@dataclass(frozen=True)
class StagePlan:
    spec: StageSpec
    first_step: int
    steps: int
    weights: dict[str, float]


class Curriculum:
    def __init__(self, spec: CurriculumSpec, streams: dict[str, Stream], batch_size: int, seed: int):
        self.spec, self.streams, self.batch_size, self.seed = spec, streams, batch_size, seed
        self.stages: list[StagePlan] = []
        step = 0
        for s in spec.stages:
            weights = self._weights(s)
            for name, w in weights.items():
                if w > 0 and streams[name].num_tokens < s.seq_len + 2:
                    raise InvalidParameterError(f"stage {s.name!r}: corpus {name!r} has {streams[name].num_tokens} "
                                                f"training tokens, fewer than one sequence of {s.seq_len}",
                                                "use a shorter seq_len or more text")
            steps = max(1, math.ceil(s.tokens / (batch_size * s.seq_len)))
            self.stages.append(StagePlan(s, step, steps, weights))
            step += steps
        self.total_steps = step

    def _weights(self, s: StageSpec) -> dict[str, float]:
        if s.mixture is None:
            total = sum(st.num_tokens for st in self.streams.values())
            return {n: st.num_tokens / total for n, st in self.streams.items()}
        unknown = sorted(set(s.mixture) - set(self.streams))
        if unknown:
            raise InvalidParameterError(f"stage {s.name!r} mixes unknown corpora {unknown}",
                                        f"use names from data.corpora: {sorted(self.streams)}")
        w = {n: float(s.mixture.get(n, 0.0)) for n in self.streams}
        if min(w.values()) < 0 or sum(w.values()) <= 0:
            raise InvalidParameterError(f"stage {s.name!r}: mixture weights must be >= 0 and not all 0",
                                        "give e.g. {shakespeare: 0.7, bible: 0.3}")
        total = sum(w.values())
        return {n: v / total for n, v in w.items()}

    def stage_at(self, step: int) -> StagePlan:
        for plan in self.stages:
            if step < plan.first_step + plan.steps:
                return plan
        return self.stages[-1]

    def competence(self, step: int) -> float:
        plan = self.stage_at(step)
        if plan.spec.competence is not None or self.spec.difficulty == "none":
            return plan.spec.competence or 1.0
        c0 = self.spec.start_competence
        t = (step - plan.first_step) / max(1, plan.steps)
        return min(1.0, math.sqrt(t * (1 - c0 * c0) + c0 * c0))

    def batch(self, step: int) -> np.ndarray:
        """The global batch of `step`: [batch_size, seq_len + 1] int64 token windows."""
        plan = self.stage_at(step)
        L = plan.spec.seq_len
        rng = np.random.default_rng([self.seed, step])
        names = list(plan.weights)
        picks = rng.choice(len(names), size=self.batch_size, p=[plan.weights[n] for n in names])
        comp = self.competence(step)
        out = np.empty((self.batch_size, L + 1), dtype=np.int64)
        for row, k in enumerate(picks):
            st = self.streams[names[k]]
            last = st.num_tokens - (L + 1)
            hi = max(1, min(last, int(comp * st.num_tokens))) if last > 0 else 1
            start = int(rng.integers(0, hi)) if last > 0 else 0
            window = st.tokens[start:start + L + 1]
            out[row, : window.size] = window
            out[row, window.size:] = st.tokens[0]  # a stream shorter than the window: padded with the separator
        return out


def validation_batches(streams: dict[str, Stream], batches: int, batch_size: int, seq_len: int,
                       seed: int) -> list[np.ndarray]:
    """A fixed validation set: windows from every corpus's held-out stream in proportion to its size."""
    rng = np.random.default_rng([seed, 0x7A1])
    names = [n for n, s in streams.items() if s.num_tokens > 1]
    sizes = np.array([streams[n].num_tokens for n in names], dtype=np.float64)
    out = []
    for _ in range(batches):
        b = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, k in enumerate(rng.choice(len(names), size=batch_size, p=sizes / sizes.sum())):
            st = streams[names[k]]
            L = min(seq_len + 1, st.num_tokens)
            start = int(rng.integers(0, st.num_tokens - L + 1))
            b[row, :L] = st.tokens[start:start + L]
            b[row, L:] = st.tokens[0]
        out.append(b)
    return out
