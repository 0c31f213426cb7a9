"""Tokenizer: a model's tokenizer (a `tokenizers.Tokenizer`) plus its special ids and chat template.

Built from a Hugging Face tokenizer.json (+ tokenizer_config.json), or from GGUF metadata (see
gguf_vocab.py); `save(directory)` writes tokenizer.json + tokenizer_config.json in Hugging Face form.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from tierlm.core.errors import CorruptModelError, InvalidParameterError
from tierlm.models.loader.chat_template import ChatTemplate


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"cannot read {path}: {exc}", "re-download the model's tokenizer files") from exc
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path} is not a JSON object", "re-download the model's tokenizer files")
    return data


class Tokenizer:
    """Text <-> token ids for one model. ids are plain ints; special tokens are single ids."""

    def __init__(self, backend, *, bos_token_id: int | None = None, eos_token_ids: Iterable[int] = (),
                 add_bos_token: bool = False, add_eos_token: bool = False, chat_template: str | None = None,
                 special_tokens: Mapping[str, str | None] | None = None, config: Mapping[str, Any] | None = None):
        self._tok = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._add_bos = add_bos_token
        self._add_eos = add_eos_token
        self._chat_template = ChatTemplate(chat_template) if chat_template else None
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._config = dict(config or {})
        added = backend.get_added_tokens_decoder()
        self._all_special_ids = frozenset(i for i, t in added.items() if t.special)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_file(cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json; chat_template.jinja next to it is used too)."""
        from tokenizers import Tokenizer as Backend

        tokenizer_json = Path(tokenizer_json)
        try:
            backend = Backend.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a plain Exception for bad JSON
            raise CorruptModelError(f"cannot read {tokenizer_json}: {str(exc).splitlines()[0]}",
                                    "re-download the model's tokenizer.json") from exc
        cfg: dict = {}
        if tokenizer_config is not None and Path(tokenizer_config).exists():
            cfg = _read_json(Path(tokenizer_config))
        template = _pick_chat_template(cfg.get("chat_template"))
        jinja_file = tokenizer_json.parent / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        special = {k: _token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
        eos_id = backend.token_to_id(special["eos_token"]) if special["eos_token"] else None
        eos_ids = [eos_id] if eos_id is not None else []
        return cls(backend, bos_token_id=bos_id, eos_token_ids=eos_ids,
                   add_bos_token=bool(cfg.get("add_bos_token", False)),
                   add_eos_token=bool(cfg.get("add_eos_token", False)),
                   chat_template=template, special_tokens=special, config=cfg)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """Build from GGUF key/values (tokenizer.ggml.* and tokenizer.chat_template)."""
        from tierlm.models.loader.gguf_vocab import GGUFVocab

        vocab = GGUFVocab.from_metadata(metadata)
        cfg = vocab.tokenizer_config()
        special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(vocab.build(), bos_token_id=vocab.bos_token_id, eos_token_ids=vocab.eos_token_ids,
                   add_bos_token=vocab.add_bos_token, add_eos_token=vocab.add_eos_token,
                   chat_template=vocab.chat_template, special_tokens=special, config=cfg)

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (Hugging Face layout) into `directory`."""
        directory = Path(directory)
        self._tok.save(str(directory / "tokenizer.json"))
        cfg = dict(self._config)
        cfg.update(self._special_tokens)
        cfg["add_bos_token"] = self._add_bos
        cfg["add_eos_token"] = self._add_eos
        if self._chat_template is not None:
            cfg["chat_template"] = self._chat_template.source
        if model_max_length:
            cfg["model_max_length"] = int(model_max_length)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")

    # ----------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. '<|im_start|>') become their ids;
        BOS/EOS are added only when the model asks for them and `add_special_tokens` is true."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"cannot tokenize a {type(text).__name__}", "pass a str", param="prompt")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            bos = self._bos_token_id
            if self._add_bos and bos is not None and (not ids or ids[0] != bos):
                ids.insert(0, bos)
            eos = self._eos_token_ids[0] if self._eos_token_ids else None
            if self._add_eos and eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidParameterError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                                        "pass ids produced by this model's tokenizer", param="ids")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for a conversation, rendered with the model's own chat template."""
        if self._chat_template is None:
            raise InvalidParameterError("this model has no chat template",
                                        "send a plain prompt (completions) or use a chat/instruct model",
                                        param="messages")
        values = dict(self._special_tokens)
        values.update(variables)
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, **values)

    # ----------------------------------------------------------------- facts
    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._all_special_ids)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template.source if self._chat_template else None

    def with_eos_token_ids(self, eos_token_ids: Iterable[int]) -> "Tokenizer":
        """A copy that stops on `eos_token_ids` (the loader merges config and generation_config ids)."""
        clone = Tokenizer.__new__(Tokenizer)
        clone.__dict__.update(self.__dict__)
        clone._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        return clone
