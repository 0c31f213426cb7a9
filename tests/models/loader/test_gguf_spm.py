"""SentencePiece-style GGUF vocabularies (tokenizer.ggml.model == "llama": Llama 2, Mistral 7B v0.1, TinyLlama).

No such GGUF is on this machine, so a tiny one is written here: <unk> <s> </s>, the 256 byte tokens, merged
pieces scored like a SentencePiece BPE model (best first), then the single characters (lowest scores).
References: hand-worked tokenizations (llama.cpp's SPM rules: merge the best-scored adjacent pair first,
always prepend one U+2581, bytes for characters without a piece, BOS by default), and transformers' own
GGUF tokenizer, which accepts this file. transformers differs from SentencePiece / llama.cpp in two places,
so those texts are compared by hand only: its Metaspace(prepend_scheme="first") adds no U+2581 to text that
already starts with a space (" hi": ▁hi, where SentencePiece gives ▁ ▁hi), and none after a special token
in the text ("<s>hello": he llo, where llama.cpp gives ▁hello; it also doubles the BOS there).
"""
from __future__ import annotations

import pytest
import torch

from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.models.loader import Tokenizer, load_checkpoint
from tierlm.models.loader.gguf import GGUFFile

from tiny_gguf import TINY

S = "\u2581"
WORDS = ("the quick brown fox jumps over lazy dog hello world this is a test of tokenizer and to in it was for on "
         "are with as be at by from they we say her she or an will my one all would there their what so up out if "
         "about who get which go me when make can like time no just him know take people good new first year way "
         "day").split()
CHARS = S + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\""


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """TINY["vocab"] tokens, types and scores laid out like a SentencePiece BPE model's GGUF export."""
    specials = [("<unk>", 2), ("<s>", 3), ("</s>", 3)]
    byte_tokens = [(f"<0x{b:02X}>", 6) for b in range(256)]
    # Score-order probes first: "bc" outranks "ab", "xy" outranks "yz".
    merged = ["bc", "xy", "ab", "yz"]
    for word in WORDS:  # each word's left-to-right chain: ▁t, ▁th, ▁the
        piece = S + word
        merged += [piece[:k] for k in range(2, len(piece) + 1) if piece[:k] not in merged]
    merged += [p for p in ("he", "ll", "llo", "er", "in", "ing", "on", "es", "ed") if p not in merged]
    room = TINY["vocab"] - len(specials) - len(byte_tokens) - len(CHARS)
    assert len(merged) >= room
    merged = merged[:room]
    tokens = [t for t, _ in specials] + [t for t, _ in byte_tokens] + merged + list(CHARS)
    types = [k for _, k in specials] + [k for _, k in byte_tokens] + [1] * (len(merged) + len(CHARS))
    scores = ([0.0] * (len(specials) + len(byte_tokens)) + [-float(i) for i in range(len(merged))]
              + [-1000.0 - i for i in range(len(CHARS))])
    assert len(tokens) == len(set(tokens)) == TINY["vocab"]
    return tokens, types, scores


def write_spm_vocab(w) -> None:
    tokens, types, scores = spm_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)  # no add_bos_token / add_space_prefix keys: llama.cpp's defaults (both on) apply


@pytest.fixture
def spm_gguf(make_gguf):
    path, hf = make_gguf(name="tiny-spm.gguf", vocab=write_spm_vocab)
    return path, hf


@pytest.fixture
def tok(spm_gguf) -> Tokenizer:
    return GGUFFile(spm_gguf[0]).tokenizer()


@pytest.fixture
def hf_tok(spm_gguf):
    transformers = pytest.importorskip("transformers")
    path = spm_gguf[0]
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text)]


TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog.",
    "abc xyz",
    "Hello World! Is this a test?",
    "line one\nline two\n\nend",
    "tabs\tand  double  spaces, trailing ",
    "unicode: café, naïve, 日本語, emoji 🤗🚀, Ελληνικά",
    "a",
    "",
]


def test_facts(tok):
    assert tok.vocab_size == TINY["vocab"]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.add_bos_token  # no add_bos_token key: llama.cpp adds BOS for SentencePiece vocabularies
    assert tok.all_special_ids == {0, 1, 2}
    assert tok.id_to_token(3 + 0x0A) == "<0x0A>"


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1
    assert 0 not in ids  # byte fallback: never <unk>
    assert tok.decode(ids) == text
    assert tok.decode(ids[1:]) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("text, pieces", [
    ("hello world", ["▁hello", "▁world"]),
    ("abc", ["▁a", "bc"]),  # bc (score 0) merges before ab (score -2), whatever comes first in the text
    ("xyz", ["▁", "xy", "z"]),  # xy (-1) before yz (-3); no "▁x" piece
    ("hello\nworld", ["▁hello", "<0x0A>", "w", "o", "r", "l", "d"]),  # no ▁ after a newline
    ("hello 🤗", ["▁hello", "▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]),
    ("é", ["▁", "<0xC3>", "<0xA9>"]),
    (" hi", ["▁", "▁hi"]),  # the dummy prefix is always added, as SentencePiece and llama.cpp do
    ("  the", ["▁", "▁", "▁the"]),
    ("a  b", ["▁a", "▁", "▁b"]),
    ("<s>hello</s>", ["▁hello", "</s>"]),  # the text's own <s> is the BOS (not doubled); ▁ after it
])
def test_hand_worked(tok, text, pieces):
    assert _pieces(tok, text) == ["<s>"] + pieces
    if "<s>" not in text:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if not t.startswith(" ")] + ["x", "zzz", "ing in on"])
def test_ids_match_transformers(tok, hf_tok, text):
    ours = tok.encode(text)
    assert ours == hf_tok.encode(text)
    assert tok.decode(ours) == hf_tok.decode(ours, skip_special_tokens=True)


def test_leading_space_differs_from_transformers_only_by_the_prefix(tok, hf_tok):
    """Documents the one known difference: transformers adds no dummy ▁ when the text starts with a space."""
    ours = _pieces(tok, " hi")
    theirs = hf_tok.convert_ids_to_tokens(hf_tok.encode(" hi"))
    assert ours == ["<s>", "▁", "▁hi"] and theirs == ["<s>", "▁hi"]


def test_flags_off(spm_gguf):
    meta = dict(GGUFFile(spm_gguf[0]).metadata, **{"tokenizer.ggml.add_bos_token": False,
                                                  "tokenizer.ggml.add_space_prefix": False})
    tok = Tokenizer.from_gguf_metadata(meta)
    assert not tok.add_bos_token
    assert _pieces(tok, "hello world") == ["he", "llo", "▁world"]
    for text in (" hello", "hello", "a  b\n"):
        assert tok.decode(tok.encode(text)) == text


def test_unsupported_and_corrupt_vocabularies(spm_gguf):
    meta = GGUFFile(spm_gguf[0]).metadata
    with pytest.raises(UnsupportedModelError, match="'bert'") as info:
        Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.model": "bert"}))
    assert "tokenizer.json" in info.value.fix and "\n" not in str(info.value)
    with pytest.raises(CorruptModelError, match="scores"):
        Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"})


def test_saved_files_reload_identically(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert again.add_bos_token and again.bos_token_id == 1 and again.all_special_ids == {0, 1, 2}
    for text in TEXTS + [" hi", "<s>hello</s>"]:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(again.encode(text)) == tok.decode(tok.encode(text))


def test_load_checkpoint_end_to_end(spm_gguf):
    path, hf = spm_gguf
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert c.vocab_size == TINY["vocab"] and c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert set(ckpt.weights) == set(hf)
    for name, t in hf.items():
        assert torch.equal(ckpt.weights[name], t), name
    tok = ckpt.tokenizer  # read back from the converted copy's tokenizer.json
    assert tok.add_bos_token
    assert [tok.id_to_token(i) for i in tok.encode("hello world")] == ["<s>", "▁hello", "▁world"]
    assert tok.decode(tok.encode(TEXTS[6])) == TEXTS[6]

    from tierlm import LLM, SamplingParams

    with LLM(str(path), dtype="fp32", device="cpu", kv_cache_memory=16 << 20) as llm:
        out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.prompt_token_ids == tok.encode("hello world")
    assert len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
