"""GGUFVocab: the tokenizer stored in GGUF metadata (tokenizer.ggml.*), rebuilt as a `tokenizers` BPE.

Two vocabulary kinds (tokenizer.ggml.model) are supported:
- "gpt2": byte-level BPE with the file's merges. The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`:
  smollm / starcoder / refact / ...: every digit on its own, then the GPT-2 byte-level regex;
  gpt2 / default: the GPT-2 byte-level regex;
  llama-bpe (Llama 3) and qwen2: their own split regex, then byte-level without the GPT-2 regex.
- "llama": SentencePiece BPE (Llama 2, Mistral 7B v0.1, TinyLlama). No merges are stored: every split (a, b)
  of a normal piece into two normal pieces is a merge, ranked by the piece's score (higher first), which is
  the order llama.cpp's SPM tokenizer merges in. Spaces become U+2581, one is prepended to each text run
  (tokenizer.ggml.add_space_prefix, default true), characters without a piece fall back to <0xXX> byte
  tokens, and BOS is added unless tokenizer.ggml.add_bos_token says otherwise. tokenizer.ggml.pre is ignored.
Token types (llama.cpp): 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
CONTROL tokens (and UNKNOWN ones in a "llama" vocabulary) become special added tokens (one id each, skipped
by decode(skip_special_tokens));
USER_DEFINED tokens become plain added tokens (one id each, kept by decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tierlm.core.errors import CorruptModelError, UnsupportedModelError

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPM_SPACE = "\u2581"  # SentencePiece's space marker

MODELS = ("gpt2", "llama")

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


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options):
    from tokenizers import models

    try:
        return models.BPE(vocab=vocab, merges=merges, **options)
    except Exception as exc:  # tokenizers raises its own exception type for bad merges
        raise CorruptModelError(f"the GGUF tokenizer is inconsistent: {exc}",
                                "re-download or re-convert the GGUF file") from exc


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
    model: str = "gpt2"  # tokenizer.ggml.model
    scores: list[float] = field(default_factory=list)  # "llama": one per token, the merge ranking
    add_space_prefix: bool = True  # "llama": prepend U+2581 to each text run

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "GGUFVocab":
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise CorruptModelError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)",
                                    "use a GGUF converted with its tokenizer, or a Hugging Face model directory")
        if model not in MODELS:
            raise UnsupportedModelError(f"GGUF tokenizer type {model!r} is not supported "
                                        "(only byte-level BPE 'gpt2' and SentencePiece BPE 'llama')",
                                        "use the model's Hugging Face directory with tokenizer.json instead")
        spm = model == "llama"
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        merges = [] if spm else list(meta.get("tokenizer.ggml.merges") or [])
        if not tokens or not (spm or merges):
            raise CorruptModelError("the GGUF tokenizer has no tokens or no merges",
                                    "re-download or re-convert the GGUF file")
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise CorruptModelError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types",
                                    "re-download or re-convert the GGUF file")
        scores = [float(x) for x in meta.get("tokenizer.ggml.scores") or []] if spm else []
        if spm and len(scores) != len(tokens):
            raise CorruptModelError(f"GGUF SentencePiece tokenizer has {len(tokens)} tokens but {len(scores)} scores",
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
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", spm)),  # llama.cpp: on for SPM
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            model=str(model), scores=scores,
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
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

    def _vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            vocab.setdefault(tok, i)
        if len(vocab) != len(self.tokens):
            raise CorruptModelError("the GGUF vocabulary has duplicate tokens",
                                    "re-download or re-convert the GGUF file")
        return vocab

    def spm_merges(self) -> list[tuple[str, str]]:
        """SentencePiece BPE merges rebuilt from the scores: every (a, b) with a, b and a+b normal pieces, the
        best-scored a+b first (ties: lower id of a+b, then the longer a)."""
        normal = {t: i for i, (t, kind) in enumerate(zip(self.tokens, self.token_types)) if kind == TOKEN_TYPE_NORMAL}
        ranked = []
        for piece, i in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-self.scores[i], i, -cut, left, right))
        ranked.sort()
        return [(left, right) for *_, left, right in ranked]

    def build(self):
        """The backend `tokenizers.Tokenizer`: byte-level BPE ("gpt2") or SentencePiece BPE ("llama")."""
        if self.model == "llama":
            return self._build_spm()
        from tokenizers import Tokenizer, decoders, processors

        vocab = self._vocab()
        pairs = []
        for merge in self.merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise CorruptModelError(f"malformed GGUF merge {merge!r}", "re-download or re-convert the GGUF file")
            pairs.append((left, right))
        bpe = _bpe(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=self.pre in ("llama-bpe", "llama3"))
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = self._pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return self._add_tokens(tok, (TOKEN_TYPE_CONTROL,))

    def _build_spm(self):
        """SentencePiece BPE: merges from the scores, byte fallback, U+2581 for spaces (see the module doc)."""
        from tokenizers import Tokenizer, decoders, normalizers

        unk = self.token(self.unk_token_id)
        if unk is None:
            unk = next((t for t, kind in zip(self.tokens, self.token_types) if kind == TOKEN_TYPE_UNKNOWN), None)
        tok = Tokenizer(_bpe(self._vocab(), self.spm_merges(), unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = [normalizers.Prepend(SPM_SPACE)] if self.add_space_prefix else []
        tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", SPM_SPACE)])
        strip = [decoders.Strip(content=" ", left=1)] if self.add_space_prefix else []
        tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse()] + strip)
        return self._add_tokens(tok, (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN))

    def _add_tokens(self, tok, special_types: tuple[int, ...]):
        """Tokens of `special_types` as special added tokens, USER_DEFINED ones as plain added tokens."""
        from tokenizers import AddedToken

        special = [AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(self.tokens, self.token_types) if kind in special_types]
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
