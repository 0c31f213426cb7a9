"""Quantized weights for a loaded checkpoint: `load_quantized(ckpt, fmt, group)` -> {Hugging Face name:
PackedWeight} for every linear weight and the token embedding, built once and cached.

Where each tensor comes from:
- a GGUF tensor stored in the requested block format (Q4_0 / Q4_1 / Q8_0) is taken as stored: the same
  numbers, only re-laid out for the kernel (q / k rows un-permuted like the fp32 path);
- so is an FP8 checkpoint's weight (loader/fp8_checkpoint.py) under --quantization fp8 when its blocks are 128
  inputs wide (any number of rows: the packed form keeps a scale per row), and under fp8_ue8m0 when its scales
  are also powers of two;
- the token embedding (and the LM head) keeps a stored Q4_0 / Q4_1 / Q8_0 format as it is; otherwise it gets
  q8_0 under a 4-bit request (the output projection is the most sensitive matrix, llama.cpp keeps it wider too)
  and the requested format under an 8-bit one;
- everything else is quantized from the checkpoint's fp32 / bf16 weights (quant.weights.quantize), except that an
  FP8 checkpoint's embedding and head stay as they are stored unless they are FP8 too.

Cache: `<cache root>/quant/<model>-<weights digest>-<format>[-g<group>]-v<N>/weights.safetensors` (a ModelCache
entry: written to a temp dir and renamed, with a manifest of xxh3 digests that is checked at every load, so a
corrupt file is rebuilt, never loaded). Its metadata names the weights digest, format, group and version;
an entry that disagrees is rebuilt too.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from tierlm.core.errors import CorruptModelError, InvalidParameterError, ModelNotFoundError
from tierlm.models.loader.cache import ModelCache
from tierlm.models.loader.checkpoint import LoadedCheckpoint
from tierlm.paths import cache_root
from tierlm.quant.weights import (EXACT_GGUF, FP8_BLOCK, FP8_FORMATS, GGUF_BLOCK_BYTES, GGUF_BLOCKS, WEIGHT_FORMATS,
                                  PackedWeight, WeightFormat, check_shape, from_gguf_blocks, pack, permute_rows,
                                  quantize, weight_format)

log = logging.getLogger(__name__)
QUANT_VERSION = 1  # bump when the packed layout or a quantization rule changes
FILE = "weights.safetensors"
EMBED = "model.embed_tokens.weight"
_LINEAR_SUFFIXES = ("_proj.weight",)


def quantized_names(weights: dict[str, torch.Tensor], fp8_stored: dict | None = None) -> list[str]:
    """The tensors a quantized model stores packed: every linear weight, the embedding and an untied LM head; of an
    FP8 checkpoint (`fp8_stored` non-empty), the embedding and head only where they are FP8 too (its authors kept
    them wider, as vLLM does)."""
    return sorted(n for n in weights if n.endswith(_LINEAR_SUFFIXES) or (
        n in (EMBED, "lm_head.weight") and (not fp8_stored or n in fp8_stored)))


def _gguf(ckpt: LoadedCheckpoint):
    """The GGUF file `ckpt` was converted from, or None (a Hugging Face directory, or the GGUF is gone)."""
    origin = ckpt.origin
    if ckpt.source != "gguf-cache" or origin is None or not Path(origin).is_file():
        return None
    from tierlm.models.loader.gguf import GGUFFile

    return GGUFFile(origin)


def _gguf_tensors(ckpt: LoadedCheckpoint) -> dict[str, tuple[str, object, tuple[int, int]]]:
    """{HF name: (GGUF type name, raw data, (n, k))} for the block-format tensors of the GGUF `ckpt` came from."""
    gguf = _gguf(ckpt)
    return {} if gguf is None else gguf.block_tensors(GGUF_BLOCK_BYTES)


_LOSSLESS = ("F32", "F16", "BF16", "F64")


def describe_sources(sources: dict[str, str]) -> tuple[str, bool]:
    """One line counting the tensors per path ("210 as stored (GGUF Q4_1), 1 as stored (GGUF Q8_0)"), and whether
    any was re-quantized from another lossy GGUF type (a second rounding: the caller warns)."""
    counts: dict[str, int] = {}
    for path in sources.values():
        counts[path] = counts.get(path, 0) + 1
    line = ", ".join(f"{n} {path}" for path, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return line, any(p.startswith("re-quantized") for p in sources.values())


def _unpermute_order(name: str, n: int, ckpt: LoadedCheckpoint) -> torch.Tensor | None:
    from tierlm.core.registry import get_architecture
    from tierlm.models.loader.gguf import unpermute_rows

    c = ckpt.config
    if not get_architecture(c.architecture).permuted_qk or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    heads = c.num_heads if name.endswith("q_proj.weight") else c.num_kv_heads
    return torch.from_numpy(unpermute_rows(np.arange(n), heads).copy())


GGUF_MODE = "gguf"  # --quantization gguf: every tensor in the format its GGUF stores, where the layout takes it


def _target(kind: str | None, is_embed: bool, fmt: str) -> tuple[bool, WeightFormat]:
    """(take the GGUF blocks as stored, else the format to quantize to) for a tensor stored as `kind` (a GGML block
    type the layout takes, or None) under --quantization `fmt`."""
    if fmt == GGUF_MODE or (is_embed and kind is not None):
        return (True, WEIGHT_FORMATS["q8_0"]) if kind is not None else (False, WEIGHT_FORMATS["q8_0"])
    f = weight_format(fmt)
    want = WEIGHT_FORMATS["q8_0"] if is_embed and f.bits == 4 else f
    # Q4_K holds what q4_1 holds (4-bit codes, a scale and min per 32) but for fp16 rounding of its scales
    return kind is not None and (kind.lower() == want.name or (kind, want.name) == ("Q4_K", "q4_1")), want


def build_quantized(ckpt: LoadedCheckpoint, fmt: str, group: int | None) -> tuple[dict[str, PackedWeight], dict]:
    """The packed tensors and a {name: path} account of where each came from: "as stored (GGUF Q4_1)",
    "quantized from F32 to q4_1", or "re-quantized Q6_K -> q4_1" (a lossy GGUF type the layout does not take:
    dequantized, then rounded again)."""
    stored = _gguf_tensors(ckpt)
    gguf = _gguf(ckpt)
    types = {} if gguf is None else gguf.tensor_types()
    packed, sources = {}, {}
    for name in quantized_names(ckpt.weights, ckpt.fp8_stored):
        w = ckpt.weights[name]
        n, k = w.shape
        kind = stored.get(name, (None,))[0]
        as_stored, want = _target(kind, name in (EMBED, "lm_head.weight"), fmt)
        fp8 = ckpt.fp8_stored.get(name)
        if fp8 is not None and want.name in FP8_FORMATS and fp8.block[1] == FP8_BLOCK and (
                want.name == "fp8" or fp8.pow2_scales):
            pw = pack(want.name, fp8.codes, fp8.row_scales(), None, 8)
            sources[name] = f"as stored (FP8 e4m3, {fp8.block[0]}x{fp8.block[1]} blocks)"
        elif as_stored:
            _, raw, shape = stored[name]
            pw = from_gguf_blocks(kind, raw, *shape)
            order = _unpermute_order(name, n, ckpt)
            if order is not None:
                pw = permute_rows(pw, order)
            sources[name] = f"as stored (GGUF {kind}" + ("" if kind in EXACT_GGUF else ", scales rounded to fp16") + ")"
        else:
            pw = quantize(w, want.name, group if want.name == fmt else None, what=name)
            src = "F8_E4M3" if fp8 is not None else types.get(
                name, str(w.dtype).removeprefix("torch.").upper().replace("FLOAT", "F"))
            sources[name] = (f"quantized from {src} to {want.name}" if src in _LOSSLESS
                             else f"re-quantized {src} -> {want.name}")
        packed[name] = pw
    return packed, sources


def check_quantizable(ckpt: LoadedCheckpoint, fmt: str, group: int | None) -> None:
    """InvalidParameterError before any work when a linear's shape cannot take `fmt` (e.g. k not a multiple of
    the group)."""
    if fmt == GGUF_MODE and _gguf(ckpt) is None:
        raise InvalidParameterError(f"--quantization gguf runs a GGUF's own blocks, and {ckpt.origin or ckpt.path} is "
                                    "not a GGUF", "point --model at a .gguf file, or pick a format (q4_1, int8, fp8, ...)")
    f = weight_format("q8_0" if fmt == GGUF_MODE else fmt)
    for name in quantized_names(ckpt.weights):
        if name not in (EMBED, "lm_head.weight"):
            n, k = ckpt.weights[name].shape
            check_shape(f, n, k, group, f"{name} [{n}, {k}]")


def _entry(ckpt: LoadedCheckpoint, fmt: str, group: int | None, root: Path | None) -> Path:
    tag = f"{fmt}-g{group}" if group else fmt
    model = ckpt.config.model_id.replace("/", "-")
    return (root or cache_root() / "quant") / f"{model}-{ckpt.weights_digest[:12]}-{tag}-v{QUANT_VERSION}"


def _meta(ckpt: LoadedCheckpoint, fmt: str, group: int | None) -> dict[str, str]:
    return {"tierlm_quant_version": str(QUANT_VERSION), "weights_digest": ckpt.weights_digest, "format": fmt,
            "group": str(group or "")}


def load_quantized(ckpt: LoadedCheckpoint, fmt: str, group: int | None = None,
                   root: Path | None = None) -> dict[str, PackedWeight]:
    """The packed weights of `ckpt` in `fmt`, from the cache or built (and cached) now."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_quantizable(ckpt, fmt, group)
    cache = ModelCache(root or cache_root() / "quant")
    entry = _entry(ckpt, fmt, group, root)
    want_meta = _meta(ckpt, fmt, group)
    if entry.is_dir():
        try:
            cache.verify(entry)
            with safe_open(str(entry / FILE), framework="pt") as fh:
                meta = fh.metadata() or {}
                if any(meta.get(k) != v for k, v in want_meta.items()):
                    raise CorruptModelError(f"{entry} was made for another model, format or version", "rebuilt")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            names = quantized_names(ckpt.weights, ckpt.fp8_stored)
            return {n: PackedWeight.from_tensors(json.loads(meta["formats"])[n], tensors, n) for n in names}
        except (CorruptModelError, ModelNotFoundError, ValueError, KeyError, OSError) as exc:
            log.warning("quantized weights %s are unusable (%s); rebuilding them", entry, exc)
            cache.discard(entry)
    start = time.perf_counter()
    packed, sources = build_quantized(ckpt, fmt, group)

    def write(tmp: Path) -> None:
        tensors = {}
        for name, pw in packed.items():
            tensors.update(pw.tensors(name))
        meta = dict(want_meta, formats=json.dumps({n: p.fmt for n, p in packed.items()}), sources=json.dumps(sources))
        save_file(tensors, str(tmp / FILE), metadata=meta)

    cache.build(entry, write)
    line, requantized = describe_sources(sources)
    log.info("quantized %s to %s in %.1fs: %s (%s)", ckpt.config.model_id, fmt, time.perf_counter() - start, line,
             entry)
    if requantized:
        fix = ("an FP8 checkpoint with 128-wide blocks (weight_scale_inv)" if fmt in FP8_FORMATS else
               "--quantization gguf (Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q4_K/Q5_K as stored)" if fmt != GGUF_MODE else
               "a GGUF in those types")
        log.warning("%s: some tensors were stored in a lossy format with no %s kernel and are rounded a second "
                    "time (%s); %s, or --quantization none, avoids it", ckpt.config.model_id, fmt, line, fix)
    return packed


def packed_bytes(n: int, k: int, bits: int, group: int, fp8: bool = False) -> int:
    """Bytes of an [n, k] weight in the packed layout: codes, and an fp16 scale and offset per group (FP8: an fp32
    scale per row and 128-input block); rows padded to the 16-row tile."""
    rows = -(-n // 16) * 16
    if fp8:
        return rows * k + rows * -(-k // FP8_BLOCK) * 4
    return rows * k * bits // 8 + rows * (k // group) * 4


def weight_bytes_by_format(ckpt: LoadedCheckpoint, group: int | None = None) -> list[dict]:
    """What the model's weights take in each format, computed from the shapes (nothing is quantized): rows of
    {"format", "linears", "embedding", "other", "total"} bytes and "as_stored", "fp32" / "bf16" first, then each weight
    format as `--quantization` would build it (GGUF blocks taken as stored where it would, the embedding per the rule
    above), and for a GGUF "gguf" (its own blocks)."""
    stored = {n: v[0] for n, v in _gguf_tensors(ckpt).items()}
    names = set(quantized_names(ckpt.weights, ckpt.fp8_stored))
    other = sum(t.numel() for n, t in ckpt.weights.items() if n not in names)
    rows = []
    for dense, size in (("fp32", 4), ("bf16", 2)):
        lin = sum(ckpt.weights[n].numel() * size for n in names if n not in (EMBED, "lm_head.weight"))
        emb = sum(ckpt.weights[n].numel() * size for n in names if n in (EMBED, "lm_head.weight"))
        rows.append({"format": dense, "linears": lin, "embedding": emb, "other": other * size})
    for fmt in (*WEIGHT_FORMATS, *((GGUF_MODE,) if stored else ())):
        lin = emb = 0
        try:
            for n in sorted(names):
                rows_, k = ckpt.weights[n].shape
                is_embed = n in (EMBED, "lm_head.weight")
                as_stored, want = _target(stored.get(n), is_embed, fmt)
                if as_stored:
                    size = packed_bytes(rows_, k, GGUF_BLOCKS[stored[n]][2], 32)
                else:
                    g = check_shape(want, rows_, k, group if want.name == fmt == "int4" else None, n)
                    size = packed_bytes(rows_, k, want.bits, g, want.name in FP8_FORMATS)
                emb, lin = (emb + size, lin) if is_embed else (emb, lin + size)
        except InvalidParameterError:
            continue  # a format this model's shapes cannot take
        rows.append({"format": fmt, "linears": lin, "embedding": emb, "other": other * 4})
    linear_kinds = {v.lower() for n, v in stored.items() if n not in (EMBED, "lm_head.weight")}
    if ckpt.fp8_stored:
        linear_kinds.add("fp8")
    if stored:
        linear_kinds.add(GGUF_MODE)
    for r in rows:
        r["total"] = r["linears"] + r["embedding"] + r["other"]
        r["as_stored"] = r["format"] in linear_kinds  # the checkpoint's linears are in this format: run as they are
    return rows


def parse_quantization(value: str | None) -> str | None:
    """'none' / None -> None; a known format name or "gguf" -> itself; else InvalidParameterError."""
    if value in (None, "none"):
        return None
    if value not in WEIGHT_FORMATS and value != GGUF_MODE:
        raise InvalidParameterError(f"unknown quantization {value!r}",
                                    f"use none, gguf or one of {', '.join(WEIGHT_FORMATS)}")
    return value
