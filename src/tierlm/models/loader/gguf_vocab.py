"""GGUFVocab: the tokenizer stored in GGUF metadata (tokenizer.ggml.*), rebuilt as a `tokenizers` BPE.

Only byte-level BPE vocabularies (tokenizer.ggml.model == "gpt2") are supported. The pre-tokenizer
follows llama.cpp's `tokenizer.ggml.pre` type:
  smollm / starcoder / refact / ...: every digit on its own, then the GPT-2 byte-level regex;
  gpt2 / default: the GPT-2 byte-level regex;
  llama-bpe (Llama 3) and qwen2: their own split regex, then byte-level without the GPT-2 regex.
Token types (llama.cpp): 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
CONTROL tokens become special added tokens (one id each, skipped by decode(skip_special_tokens));
USER_DEFINED tokens become plain added tokens (one id each, kept by decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from tierlm.core.errors import CorruptModelError, UnsupportedModelError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt2", "gpt-2", "default")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}


def _optional_id(meta: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_vocab:
        raise CorruptModelError(f"GGUF metadata {key}={value} is outside the vocabulary (size {n_vocab})",
                                "re-download or re-convert the GGUF file")
    return value


@dataclass
class GGUFVocab:
    """The vocabulary facts of a GGUF file, plus the backend tokenizer built from them."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "GGUFVocab":
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise CorruptModelError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)",
                                    "use a GGUF converted with its tokenizer, or a Hugging Face model directory")
        if model != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer type {model!r} is not supported (only byte-level BPE 'gpt2')",
                                        "use the model's Hugging Face directory with tokenizer.json instead")
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        merges = list(meta.get("tokenizer.ggml.merges") or [])
        if not tokens or not merges:
            raise CorruptModelError("the GGUF tokenizer has no tokens or no merges",
                                    "re-download or re-convert the GGUF file")
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise CorruptModelError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types",
                                    "re-download or re-convert the GGUF file")
        n = len(tokens)
        eos = _optional_id(meta, "tokenizer.ggml.eos_token_id", n)
        eos_ids = [eos] if eos is not None else []
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            extra_id = _optional_id(meta, key, n)
            if extra_id is not None and extra_id not in eos_ids:
                eos_ids.append(extra_id)
        return cls(
            tokens=tokens, token_types=[int(t) for t in types], merges=merges,
            pre=str(meta.get("tokenizer.ggml.pre") or "default"),
            bos_token_id=_optional_id(meta, "tokenizer.ggml.bos_token_id", n),
            eos_token_ids=tuple(eos_ids),
            pad_token_id=_optional_id(meta, "tokenizer.ggml.padding_token_id", n),
            unk_token_id=_optional_id(meta, "tokenizer.ggml.unknown_token_id", n),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def _pre_tokenizer(self):
        from tokenizers import Regex, pre_tokenizers

        if self.pre in _DIGITS_THEN_GPT2:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        if self.pre in _GPT2:
            return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self.pre in _SPLIT_REGEX:
            return pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[self.pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        supported = sorted(_DIGITS_THEN_GPT2 + _GPT2 + tuple(_SPLIT_REGEX))
        raise UnsupportedModelError(f"GGUF pre-tokenizer {self.pre!r} is not supported",
                                    f"use a model whose tokenizer.ggml.pre is one of {', '.join(supported)}, "
                                    "or its Hugging Face directory with tokenizer.json")

    def build(self):
        """The backend `tokenizers.Tokenizer` (byte-level BPE, added tokens, byte-level decoder)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, processors

        vocab: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            vocab.setdefault(tok, i)
        if len(vocab) != len(self.tokens):
            raise CorruptModelError("the GGUF vocabulary has duplicate tokens",
                                    "re-download or re-convert the GGUF file")
        pairs = []
        for merge in self.merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise CorruptModelError(f"malformed GGUF merge {merge!r}", "re-download or re-convert the GGUF file")
            pairs.append((left, right))
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                             ignore_merges=self.pre in ("llama-bpe", "llama3"))
        except Exception as exc:  # tokenizers raises its own exception type for bad merges
            raise CorruptModelError(f"the GGUF tokenizer is inconsistent: {exc}",
                                    "re-download or re-convert the GGUF file") from exc
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = self._pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        special = [AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(self.tokens, self.token_types) if kind == TOKEN_TYPE_CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, kind in zip(self.tokens, self.token_types) if kind == TOKEN_TYPE_USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        return tok

    def tokenizer_config(self, model_max_length: int | None = None) -> dict:
        """tokenizer_config.json content (Hugging Face keys) for the converted copy."""
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.token(self.bos_token_id),
            "eos_token": self.token(self.eos_token_ids[0] if self.eos_token_ids else None),
            "pad_token": self.token(self.pad_token_id),
            "unk_token": self.token(self.unk_token_id),
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length:
            cfg["model_max_length"] = int(model_max_length)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg
