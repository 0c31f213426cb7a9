"""Membership inference by loss: how much more likely a model finds a text than it should.

Scores (higher = more likely the model trained on the text), from teacher-forced log-probabilities computed by
the engine itself (LLMEngine.score: prefill, then each token fed back as a decode step):
  loss     minus the mean next-token loss (Yeom et al. 2018)
  min_k    the mean of the k% lowest token log-probabilities (Min-K% Prob, Shi et al. 2024; k = 20%)
  ratio    minus the loss under the target over the loss under a reference model (Carlini et al. 2021's
           reference-model calibration): texts every model finds easy do not count as members
The attack AUC of members against non-members (Mann-Whitney: the chance a random member outscores a random
non-member, ties half) is the memorization figure: 0.5 is none.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierlm.core.errors import InvalidParameterError

MAX_TOKENS = 256  # per text: longer texts are scored on their first MAX_TOKENS tokens (or the model's context)
MIN_K = 0.2


@dataclass
class TextScores:
    loss: list[float]
    min_k: list[float]
    tokens: list[int]
    ratio: list[float] | None = None

    def get(self, name: str) -> list[float] | None:
        return getattr(self, name)


def token_logprobs(engine, token_lists: list[list[int]], batch: int = 16) -> list[np.ndarray]:
    """Per text, the log-probability of each token after the first, given the tokens before it."""
    out: list[np.ndarray] = []
    cap = min(MAX_TOKENS, engine.max_model_len)  # a text longer than the model's context is scored on its start
    for i in range(0, len(token_lists), batch):
        chunk = [ids[:cap] for ids in token_lists[i:i + batch]]
        logits = engine.score([ids[:1] for ids in chunk], [ids[1:] for ids in chunk])
        for ids, lg in zip(chunk, logits):
            lp = lg.float().log_softmax(-1)
            target = lp.new_tensor(ids[1:], dtype=lp.dtype).long()
            out.append(lp.gather(1, target.unsqueeze(1)).squeeze(1).numpy())
    return out


def encode(engine, texts: list[str]) -> list[list[int]]:
    ids = [engine.tokenizer.encode(t) for t in texts]
    short = [i for i, x in enumerate(ids) if len(x) < 3]
    if short:
        raise InvalidParameterError(f"text {short[0]} has fewer than 3 tokens: nothing to score",
                                    "drop empty or one-word texts from the split")
    return ids


def scores(engine, texts: list[str] | None = None, token_lists: list[list[int]] | None = None,
           reference=None, k: float = MIN_K) -> TextScores:
    """Scores of texts (or of token id lists, in the target's vocabulary) under `engine`, and the loss ratio
    against `reference` (an engine; texts are re-tokenized with its tokenizer) when given."""
    if token_lists is None:
        token_lists = encode(engine, texts or [])
    lps = token_logprobs(engine, token_lists)
    loss = [-float(lp.mean()) for lp in lps]
    min_k = [float(np.sort(lp)[:max(1, int(len(lp) * k))].mean()) for lp in lps]
    out = TextScores([-x for x in loss], min_k, [len(lp) + 1 for lp in lps])
    if reference is not None:
        if texts is None:
            texts = [engine.tokenizer.decode(ids) for ids in token_lists]
        ref_lps = token_logprobs(reference, encode(reference, texts))
        out.ratio = [-(a / max(1e-6, -float(r.mean()))) for a, r in zip(loss, ref_lps)]
    return out


def auc(members: list[float], nonmembers: list[float]) -> float:
    """P(a member's score > a non-member's), ties counted half (the ROC AUC)."""
    if not members or not nonmembers:
        raise InvalidParameterError("membership AUC needs members and non-members", "give both splits")
    m = np.asarray(members, dtype=np.float64)
    n = np.asarray(nonmembers, dtype=np.float64)
    allv = np.concatenate([m, n])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def read_texts(path: str | Path) -> list[str]:
    """Texts of a split file: JSONL (each record's "text", or the string itself) or one text per line."""
    import json

    path = Path(path)
    if not path.exists():
        raise InvalidParameterError(f"split file {path} does not exist", "fix the path")
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".ndjson"):
            try:
                rec = json.loads(line)
            except ValueError:
                raise InvalidParameterError(f"{path} line {n} is not JSON", "fix the line") from None
            line = rec.get("text", "") if isinstance(rec, dict) else str(rec)
        texts.append(line)
    if not texts:
        raise InvalidParameterError(f"split file {path} holds no texts", "one text per line, or JSONL with text")
    return texts


def run_split(run_dir: str | Path, limit: int = 200, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(members, non-members) as token ids of a `tierlm train` run: documents of its prepared training streams
    and of its held-out validation streams (a random `limit` of each; documents cut to MAX_TOKENS)."""
    from tierlm.train.trainer import _load_streams

    prep = Path(run_dir) / "prepared"
    if not (prep / "train.npz").exists():
        raise InvalidParameterError(f"{run_dir} is not a tierlm train run (no prepared/train.npz)",
                                    "pass the --out directory of `tierlm train`")
    rng = np.random.default_rng(seed)

    def docs(path: Path) -> list[list[int]]:
        out = []
        for s in _load_streams(path).values():
            ends = list(s.starts[1:]) + [len(s.tokens)]
            out += [s.tokens[a:min(b, a + MAX_TOKENS)].tolist() for a, b in zip(s.starts, ends) if b - a >= 8]
        idx = rng.permutation(len(out))[:limit]
        return [out[i] for i in sorted(idx)]

    return docs(prep / "train.npz"), docs(prep / "val.npz")
