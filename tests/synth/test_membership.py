"""Membership inference scores: the AUC is the Mann-Whitney statistic (checked on known values), and on the
default model natural sentences outscore the same words shuffled (a split separable by construction)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from tierlm.core.errors import InvalidParameterError
from tierlm.synth import membership as mi

SENTENCES = [
    "The cat sat on the mat and looked out of the window at the rain.",
    "She opened the door, took off her coat and put the kettle on for tea.",
    "In the morning we walked to the market to buy bread, cheese and apples.",
    "The children played in the park until the sun went down behind the hills.",
    "He wrote a long letter to his brother who lived by the sea in the north.",
    "After dinner the family sat by the fire and told stories about the old days.",
    "The train was late, so they waited on the platform and talked about the weather.",
    "Our teacher asked us to read the first chapter of the book before Monday.",
]


def shuffled(text: str, seed: int) -> str:
    words = text.rstrip(".").split()
    random.Random(seed).shuffle(words)
    return " ".join(words) + "."


def test_auc_known_values():
    assert mi.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert mi.auc([0, 1], [2, 3]) == 0.0
    assert mi.auc([1, 1], [1, 1]) == 0.5  # ties count half
    assert mi.auc([1, 3], [2, 0]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    with pytest.raises(InvalidParameterError):
        mi.auc([], [1.0])


def test_natural_text_outscores_shuffled_text(default_llm):
    engine = default_llm.engine
    members = SENTENCES
    nonmembers = [shuffled(s, i) for i, s in enumerate(SENTENCES)]
    sm, sn = mi.scores(engine, members), mi.scores(engine, nonmembers)
    assert mi.auc(sm.loss, sn.loss) >= 0.95
    assert mi.auc(sm.min_k, sn.min_k) >= 0.9
    assert all(t > 10 for t in sm.tokens)
    # the scores are the model's own: a text's loss equals the mean negative log-probability of its tokens
    lp = mi.token_logprobs(engine, mi.encode(engine, members[:1]))[0]
    assert sm.loss[0] == pytest.approx(float(lp.mean()), rel=1e-5)
    lowest = np.sort(lp)[: max(1, int(len(lp) * mi.MIN_K))]
    assert sm.min_k[0] == pytest.approx(float(lowest.mean()), rel=1e-5)


def test_ratio_against_a_reference_model_is_one_for_the_model_itself(default_llm):
    engine = default_llm.engine
    s = mi.scores(engine, SENTENCES[:3], reference=engine)
    assert s.ratio == pytest.approx([-1.0] * 3, rel=1e-5)


def test_too_short_texts_are_refused(default_llm):
    with pytest.raises(InvalidParameterError, match="fewer than 3 tokens"):
        mi.scores(default_llm.engine, ["Hi"])
