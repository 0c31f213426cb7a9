"""The default model's tokenizer, built from GGUF metadata, against transformers' GGUF tokenizer.

transformers' GGUF conversion drops SmolLM2's individual-digit pre-split (llama.cpp's 'smollm' rule:
every \\p{N} character is its own pre-token before the GPT-2 regex). So for texts with digits the
reference is: split the text at every numeric character, encode each piece with transformers, concat.
"""
from __future__ import annotations

import unicodedata

import pytest

from tierlm.core.errors import InvalidParameterError
from tierlm.models.loader import Tokenizer

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "unicode: héllo wörld, naïve café, 日本語のテキスト, emoji 🤗🚀, Ελληνικά, русский",
    "It's we'll they've I'd you're",
    "Numbers: 12345 and 3.14159, year 2024, phone +1-555-0100",
    "x1y22z333 and 007 and ٣٤ (Arabic-Indic) and 1,000,000",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x**2  # 42\n",
    "",
]


def _numeric_split(text: str) -> list[str]:
    """llama.cpp 'smollm' first stage: each numeric character (\\p{N}) alone, the rest in spans."""
    pieces, cur = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            if cur:
                pieces.append(cur)
            pieces.append(ch)
            cur = ""
        else:
            cur += ch
    if cur:
        pieces.append(cur)
    return pieces


def _reference_ids(hf_tok, text: str) -> list[int]:
    ids: list[int] = []
    for piece in _numeric_split(text):
        ids += hf_tok.encode(piece, add_special_tokens=False)
    return ids


@pytest.fixture(scope="module")
def tok(default_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(default_metadata)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers_with_smollm_digit_rule(tok, hf_gguf_tokenizer, text):
    ours = tok.encode(text)
    assert ours == _reference_ids(hf_gguf_tokenizer, text)
    if not any(unicodedata.category(c).startswith("N") for c in text):
        assert ours == hf_gguf_tokenizer.encode(text, add_special_tokens=False)


def test_every_digit_is_its_own_token(tok):
    ids = tok.encode("in 1984 and 2024, 9876543210")
    digit_tokens = [tok.id_to_token(i) for i in ids if any(c.isdigit() for c in tok.id_to_token(i))]
    assert digit_tokens == list("1984") + list("2024") + list("9876543210")


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.all_special_ids == set(range(17))
    assert tok.vocab_size == 49152
    assert not tok.add_bos_token  # SmolLM2: no BOS prepended
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"  # specials skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_bos_added_only_when_model_says_so(default_metadata):
    meta = dict(default_metadata, **{"tokenizer.ggml.add_bos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("hi")[0] == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.encode("<|im_start|>hi").count(1) == 1  # never a doubled BOS


def test_chat_template_matches_transformers(tok, hf_gguf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    for conv in (messages, [{"role": "system", "content": "Be brief."}] + messages):
        ours = tok.apply_chat_template(conv, add_generation_prompt=True)
        theirs = hf_gguf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert ours == theirs
    assert tok.has_chat_template


def test_chat_template_raise_exception_is_typed(default_metadata):
    meta = dict(default_metadata, **{"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"})
    with pytest.raises(InvalidParameterError, match="roles must alternate"):
        Tokenizer.from_gguf_metadata(meta).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(default_metadata):
    meta = {k: v for k, v in default_metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert not tok.has_chat_template
    with pytest.raises(InvalidParameterError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_saved_files_reload_identically(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.bos_token_id == tok.bos_token_id and again.eos_token_ids == tok.eos_token_ids
    assert again.all_special_ids == tok.all_special_ids
    conv = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(conv) == tok.apply_chat_template(conv)


def test_cached_tokenizer_loads_in_transformers(default_ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(default_ckpt.path))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == default_ckpt.tokenizer.encode(text)


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        tok.decode([49152])
