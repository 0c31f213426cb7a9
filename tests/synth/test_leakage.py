"""Leakage scan: planted verbatim copies found exactly, novel text clean, matches verified, not hashed."""
from __future__ import annotations

import json
import random

import pytest

from tierlm.core.errors import InvalidParameterError
from tierlm.synth.leakage import LeakageIndex, words_of

CORPUS_VOCAB = ["lord", "earth", "waters", "light", "darkness", "firmament", "heaven", "seed", "fruit", "tree",
                "land", "beast", "cattle", "fowl", "morning", "evening", "day", "night", "sea", "grass",
                "herb", "creature", "image", "dominion", "face", "deep", "spirit", "moved", "said", "saw"]
NOVEL_VOCAB = ["kernel", "tensor", "cache", "page", "block", "token", "decode", "prefill", "batch", "queue",
               "tier", "shard", "latency", "throughput", "memory", "quantize", "sampler", "logits"]


def corpus_words(count: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(CORPUS_VOCAB) for _ in range(count)]


def render(words: list[str]) -> str:
    """Words as prose: capitalised sentences of 12 words, commas, line breaks."""
    out = []
    for i, w in enumerate(words):
        w = w.capitalize() if i % 12 == 0 else w
        out.append(w + ("." if i % 12 == 11 else "," if i % 12 == 5 else "") + ("\n" if i % 36 == 35 else " "))
    return "".join(out)


def novel(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(NOVEL_VOCAB) for _ in range(count)]


WORDS = corpus_words()
CORPUS = render(WORDS)


@pytest.fixture(scope="module")
def index() -> LeakageIndex:
    return LeakageIndex(CORPUS)


def test_corpus_normalisation_is_words():
    assert words_of(CORPUS) == WORDS
    assert words_of("And GOD said, Let there be light:\nand there was light.") == \
        "and god said let there be light and there was light".split()


def test_planted_copy_found_exactly(index):
    copied = WORDS[1000:1030]
    sample = " ".join(novel(20, 1) + copied + novel(20, 2))
    report = index.scan([sample])
    assert report.samples == 1 and report.samples_with_match == 1
    [m] = report.longest
    assert (m.sample, m.words, m.text) == (0, 30, " ".join(copied))
    assert report.ngram_overlap == [pytest.approx((30 - 8 + 1) / (70 - 8 + 1))]
    assert report.match_words == [30]


def test_novel_text_has_no_overlap(index):
    samples = [" ".join(novel(100, s)) for s in range(5)] + ["", "too short to have an eight word gram"]
    report = index.scan(samples)
    assert report.ngram_overlap == [0.0] * 7 and report.mean_overlap == 0.0
    assert report.samples_with_match == 0 and report.longest == [] and report.match_words == [0] * 7


def test_word_order_matters(index):
    reversed_copy = WORDS[740:700:-1]  # the same words, reversed: no 8-gram of it is in the corpus
    report = index.scan([" ".join(reversed_copy)])
    assert report.ngram_overlap == [0.0] and report.longest == []


def test_one_changed_word_splits_the_match(index):
    copied = WORDS[2000:2030]
    changed = copied[:15] + ["tensor"] + copied[16:]
    sample = " ".join(novel(10, 3) + changed + novel(10, 4))  # 50 words, 43 eight-grams
    report = index.scan([sample])
    assert report.longest[0].words == 15 and report.longest[0].text == " ".join(copied[:15])
    assert report.ngram_overlap == [pytest.approx(((15 - 7) + (14 - 7)) / 43)]


def test_case_and_punctuation_do_not_matter(index):
    copied = WORDS[500:520]
    shouted = "; ".join(w.upper() for w in copied[:10]) + "!!\n" + " -- ".join(copied[10:]).title()
    report = index.scan([f"Quote: «{shouted}» (end)"])
    assert report.longest[0].text == " ".join(copied)  # reported in normalised form: lower case, single spaces
    assert report.ngram_overlap == [pytest.approx((20 - 7) / (22 - 7))]  # "quote" and "end" are novel


def test_longest_across_samples_sorted_and_cut_to_top(index):
    lengths = [12, 40, 0, 25, 8, 40]
    samples = [" ".join(novel(5, i) + WORDS[100 * i:100 * i + k] + novel(5, i + 50)) for i, k in enumerate(lengths)]
    report = index.scan(samples, top=3)
    assert report.match_words == lengths and report.samples_with_match == 5
    assert [(m.sample, m.words) for m in report.longest] == [(1, 40), (5, 40), (3, 25)]
    assert index.scan(samples, top=0).longest == []
    d = json.loads(json.dumps(report.to_dict()))
    assert d["n"] == 8 and d["samples"] == 6 and d["samples_with_match"] == 5
    assert d["longest"][0] == {"sample": 1, "words": 40, "text": " ".join(WORDS[100:140])}
    assert d["mean_overlap"] == pytest.approx(sum(report.ngram_overlap) / 6)
    with pytest.raises(InvalidParameterError, match="top"):
        index.scan(samples, top=-1)


def test_hash_runs_are_verified_against_the_corpus():
    # Every 8-gram of the sample occurs, but the 13 words never occur together: the longest real copy is the
    # 11 words of the second document.
    docs = ["alpha bravo charlie delta echo foxtrot golf hotel india juliet",
            "charlie delta echo foxtrot golf hotel india juliet kilo lima mike"]
    report = LeakageIndex(docs).scan(["alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike"])
    assert report.ngram_overlap == [1.0]
    assert report.longest[0].text == "charlie delta echo foxtrot golf hotel india juliet kilo lima mike"


def test_matches_are_whole_words():
    # "juliet" is not "julietta": the 10-word sample occurs in neither document as a whole.
    docs = ["alpha bravo charlie delta echo foxtrot golf hotel india julietta",
            "bravo charlie delta echo foxtrot golf hotel india juliet"]
    report = LeakageIndex(docs).scan(["alpha bravo charlie delta echo foxtrot golf hotel india juliet"])
    assert report.ngram_overlap == [1.0]
    [m] = report.longest
    assert (m.words, m.text) == (9, "alpha bravo charlie delta echo foxtrot golf hotel india")


def test_documents_are_not_joined():
    first, second = "one two three four five", "six seven eight nine ten"
    sample = "one two three four five six seven eight nine ten"
    apart = LeakageIndex([first, second, "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"])
    assert apart.scan([sample]).ngram_overlap == [0.0] and apart.scan([sample]).longest == []
    together = LeakageIndex(f"{first}.\n{second}")
    assert together.scan([sample]).longest[0].words == 10


def test_n_is_configurable(index):
    sample = " ".join(novel(10, 5) + WORDS[50:55] + novel(10, 6))
    assert index.scan([sample]).samples_with_match == 0
    short = LeakageIndex(CORPUS, n=4).scan([sample])
    assert short.n == 4 and short.longest[0].text == " ".join(WORDS[50:55])


def test_long_document_is_indexed_across_pieces(monkeypatch):
    import tierlm.synth.leakage as leakage

    monkeypatch.setattr(leakage, "_CHUNK_CHARS", 37)  # cut the corpus into many small pieces
    index = LeakageIndex(CORPUS)
    assert index._text == f" {' '.join(WORDS)} "
    assert index.scan([" ".join(WORDS[10:60])]).longest[0].words == 50
    assert list(leakage._pieces("a" * 100, 30)) == ["a" * 100]  # a word longer than a piece stays whole
    assert list(leakage._pieces("ab cd", 3)) == ["ab ", "cd"] and list(leakage._pieces("", 3)) == []


def test_from_paths(tmp_path):
    (tmp_path / "books" / "nested").mkdir(parents=True)
    (tmp_path / "books" / "one.txt").write_text(render(WORDS[:1500]), encoding="utf-8")
    (tmp_path / "books" / "nested" / "two.MD").write_text(render(WORDS[1500:]), encoding="utf-8")
    (tmp_path / "books" / "skip.json").write_text(" ".join(NOVEL_VOCAB), encoding="utf-8")
    single = tmp_path / "single.text"
    single.write_text(" ".join(NOVEL_VOCAB[:9]), encoding="utf-8")
    index = LeakageIndex.from_paths([tmp_path / "books", str(single)])
    samples = [" ".join(w) for w in (WORDS[1490:1510], WORDS[1600:1620], NOVEL_VOCAB[9:], NOVEL_VOCAB[:9])]
    assert index.scan(samples).match_words == [10, 20, 0, 9]  # files are separate documents; .json is skipped

    with pytest.raises(InvalidParameterError, match="nowhere.txt"):
        LeakageIndex.from_paths([tmp_path / "books", tmp_path / "nowhere.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidParameterError, match="no .txt or .md files"):
        LeakageIndex.from_paths([tmp_path / "empty"])


def test_bad_corpus_and_n():
    with pytest.raises(InvalidParameterError, match="no passage of 8 words"):
        LeakageIndex("seven words are not enough for this")
    with pytest.raises(InvalidParameterError, match="no passage"):
        LeakageIndex([])
    with pytest.raises(InvalidParameterError, match="below 1"):
        LeakageIndex(CORPUS, n=0)
