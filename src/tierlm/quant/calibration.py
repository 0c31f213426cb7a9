"""Static FP8 KV scales: record per-layer, per-head |K| and |V| maxima on calibration prompts, save them next
to the cached model, load them for a static-scale KV format.

    tierlm calibrate --model M --data FILE     runs FILE's prompts through the engine (fp32 KV), records
                                               amax per (layer, K/V, KV head), writes
                                               <cache root>/calibration/<model digest>.json
    --kv-format fp8_e4m3_static                the engine loads that file (or CacheConfig.kv_scales_path):
                                               scale = amax * margin / fmax per (layer, K/V, head)

The file names the model it was measured on (model id, weights digest, config digest); loading it for
another model, or a static format without any file, is an error naming the fix, never a silent scale of
1.0. Values beyond the calibrated range saturate at the format's max (the margin leaves headroom).
The file's digest joins the KV format in the block-hash keys, so KV cached under one calibration is never
read under another.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from tierlm.core.errors import InvalidParameterError

FORMAT = "tierlm-kv-scales/1"
DEFAULT_MARGIN = 1.0


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    weights_digest: str
    config_digest: str


def default_path(identity: ModelIdentity) -> Path:
    from tierlm.paths import cache_root

    return cache_root() / "calibration" / f"{identity.weights_digest}-{identity.config_digest[:16]}.json"


@dataclass
class KVScales:
    """amax[layer][kv][head] of a model's K (kv=0) and V (kv=1), measured on `tokens` calibration tokens."""

    identity: ModelIdentity
    amax: torch.Tensor  # [L, 2, Hkv] fp32
    tokens: int
    source: str = ""
    margin: float = DEFAULT_MARGIN

    @property
    def digest(self) -> str:
        return xxhash.xxh3_64_hexdigest(self.amax.numpy().tobytes() + repr(self.margin).encode())

    def scales(self, fmax: float) -> torch.Tensor:
        """[L, 2, Hkv] fp32: amax * margin / fmax (a head that never saw a nonzero value gets 1.0)."""
        s = self.amax * self.margin / fmax
        return torch.where(s > 0, s, torch.ones_like(s))

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "model_id": self.identity.model_id, "weights_digest": self.identity.weights_digest,
               "config_digest": self.identity.config_digest, "tokens": self.tokens, "source": self.source,
               "margin": self.margin, "amax": self.amax.tolist()}
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
        return path


def load_scales(path: Path, identity: ModelIdentity, num_layers: int, num_kv_heads: int) -> KVScales:
    """The calibration at `path` for this model; InvalidParameterError naming the fix when it is missing,
    unreadable, for another model or of another shape."""
    fix = "run `tierlm calibrate --data FILE` with the same --model first, or pass --kv-scales PATH"
    if not path.is_file():
        raise InvalidParameterError(f"no KV calibration for model {identity.model_id} at {path}", fix)
    try:
        doc = json.loads(path.read_text())
        amax = torch.tensor(doc["amax"], dtype=torch.float32)
        found = ModelIdentity(doc["model_id"], doc["weights_digest"], doc["config_digest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidParameterError(f"KV calibration file {path} is unreadable ({e})", fix) from None
    if doc.get("format") != FORMAT:
        raise InvalidParameterError(f"KV calibration file {path} has format {doc.get('format')!r}, not {FORMAT}", fix)
    if (found.weights_digest, found.config_digest) != (identity.weights_digest, identity.config_digest):
        raise InvalidParameterError(
            f"KV calibration file {path} was measured on another model ({found.model_id}, weights "
            f"{found.weights_digest[:12]}), not {identity.model_id} (weights {identity.weights_digest[:12]})", fix)
    if tuple(amax.shape) != (num_layers, 2, num_kv_heads) or not torch.isfinite(amax).all() or (amax < 0).any():
        raise InvalidParameterError(f"KV calibration file {path} holds amax of shape {tuple(amax.shape)}, expected "
                                    f"[{num_layers}, 2, {num_kv_heads}] of finite non-negative values", fix)
    return KVScales(found, amax, int(doc.get("tokens", 0)), doc.get("source", ""), float(doc.get("margin", 1.0)))


class AmaxRecorder:
    """Wraps an attention backend: every K/V written passes through `write_kv`, whose per-head |max| is
    folded into amax[layer, K/V, head]. Install with `engine.runner.backend = AmaxRecorder(...)`."""

    def __init__(self, inner, storage):
        self.inner = inner
        self.name, self.summary = inner.name, inner.summary
        self._index = {id(layer): i for i, layer in enumerate(storage.layers)}
        self.amax = torch.zeros(len(storage.layers), 2, storage.spec.num_kv_heads)
        self.tokens = 0

    def prepare(self, meta, num_blocks):
        return self.inner.prepare(meta, num_blocks)

    def write_kv(self, layer, k, v, meta):
        i = self._index[id(layer)]
        # k, v: [T, Hkv, D] -> [2, Hkv]
        seen = torch.stack((k.detach().float().abs().amax(dim=(0, 2)), v.detach().float().abs().amax(dim=(0, 2))))
        self.amax[i] = torch.maximum(self.amax[i], seen.cpu())
        if i == 0:
            self.tokens += k.shape[0]
        return self.inner.write_kv(layer, k, v, meta)  # (k, v) as stored

    def attend(self, q, k, v, layer, meta, scale):
        return self.inner.attend(q, k, v, layer, meta, scale)


def read_prompts(path: Path) -> list[str]:
    """Calibration prompts: a .jsonl file (one object per line with "prompt" or "text"), else plain text split
    on blank lines into paragraphs (empty ones dropped)."""
    if not path.is_file():
        raise InvalidParameterError(f"calibration data {path} is not a file", "give a .txt or .jsonl file of prompts")
    text = path.read_text(errors="replace")
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(str(obj.get("prompt", obj.get("text"))))
            except (ValueError, AttributeError):
                raise InvalidParameterError(f"{path}:{n} is not a JSON object", 'write one {"prompt": "..."} per line') from None
    else:
        prompts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not prompts:
        raise InvalidParameterError(f"calibration data {path} holds no prompts", "give it some text")
    return prompts
