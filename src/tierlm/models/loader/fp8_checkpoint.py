"""FP8 checkpoints in Hugging Face layout ("fine-grained FP8", as DeepSeek-V3 and the Qwen3 / Llama FP8 releases
store them): config.json's quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size":
[128, 128]}, and per quantized linear `X.weight` in float8_e4m3fn with `X.weight_scale_inv` fp32
[ceil(n / bn), ceil(k / bk)]; the weight's value is weight * scale_inv (the name is the inverse of the quantizer's
scale, which divided).

`split_fp8(weights, quant_config, where)` dequantizes every FP8 tensor to fp32 (one rounding: the exact weights, for
--quantization none and the other formats) and keeps the stored bytes and scales (`Fp8Stored`), which
`--quantization fp8` runs as they are (models/loader/quantized.py). A checkpoint quantized with another method
(GPTQ, AWQ, bitsandbytes, ...) is refused by name rather than read as plain weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.core.errors import CorruptModelError, UnsupportedModelError
from tierlm.quant.weights import expand_blocks

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8Stored:
    """One FP8 weight as stored: e4m3 bytes [n, k] and the block scales (`scale_inv`) [ceil(n / bn), ceil(k / bk)]."""

    codes: torch.Tensor  # uint8
    scale_inv: torch.Tensor  # fp32
    block: tuple[int, int]

    def row_scales(self) -> torch.Tensor:
        """[n, ceil(k / bk)]: each row's scale per block of bk inputs."""
        return expand_blocks(self.scale_inv, (self.block[0], 1), (self.codes.shape[0], self.scale_inv.shape[1]))

    def dequantize(self) -> torch.Tensor:
        return self.codes.view(torch.float8_e4m3fn).float() * expand_blocks(self.scale_inv, self.block,
                                                                             tuple(self.codes.shape))

    @property
    def pow2_scales(self) -> bool:
        """Every scale a power of two (UE8M0-representable)."""
        m, _ = torch.frexp(self.scale_inv)
        return bool((m.abs() == 0.5).all())


def block_size(quant_config: dict | None, where: str) -> tuple[int, int] | None:
    """The FP8 weight block (rows, inputs) of a config.json's quantization_config; None when there is none.
    UnsupportedModelError for another quantization method or FP8 flavour."""
    if not quant_config:
        return None
    method = str(quant_config.get("quant_method", "")).lower()
    if method != "fp8":
        raise UnsupportedModelError(
            f"{where}: the checkpoint is quantized with {method or 'an unnamed method'!r}, which tierlm does not read",
            "use the model's unquantized (bf16 / fp32) checkpoint; tierlm quantizes it itself with --quantization "
            "int4 | int8 | fp8, or load its GGUF")
    fmt = str(quant_config.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise UnsupportedModelError(f"{where}: FP8 weights in {fmt!r}; tierlm reads e4m3 FP8 checkpoints",
                                    "use the model's bf16 checkpoint")
    block = quant_config.get("weight_block_size") or DEFAULT_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CorruptModelError(f"{where}: quantization_config.weight_block_size is {block!r}, not [rows, inputs]",
                                "fix config.json (DeepSeek-style FP8 checkpoints use [128, 128])")
    return int(block[0]), int(block[1])


def split_fp8(weights: dict[str, torch.Tensor], block: tuple[int, int] | None,
              where: str) -> tuple[dict[str, torch.Tensor], dict[str, Fp8Stored]]:
    """(weights with each FP8 tensor dequantized to fp32 and the *_scale_inv tensors dropped, {name: Fp8Stored})."""
    out, stored = {}, {}
    for name, t in weights.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            out[name] = t
            continue
        scale = weights.get(name + SCALE_SUFFIX)
        if t.dtype != torch.float8_e4m3fn or block is None or scale is None or t.dim() != 2:
            what = ("is e5m2" if t.dtype != torch.float8_e4m3fn else
                    "has no quantization_config in config.json" if block is None else
                    f"has no {name}{SCALE_SUFFIX}" if scale is None else "is not a matrix")
            raise CorruptModelError(f"{where}: tensor {name} is FP8 but {what}",
                                    "re-download the model: tierlm reads block-scaled e4m3 FP8 checkpoints "
                                    "(weight + weight_scale_inv, quantization_config.weight_block_size)")
        n, k = t.shape
        want = (-(-n // block[0]), -(-k // block[1]))
        if tuple(scale.shape) != want:
            raise CorruptModelError(f"{where}: {name}{SCALE_SUFFIX} has shape {list(scale.shape)}, the {block[0]}x"
                                    f"{block[1]} blocks of a [{n}, {k}] weight need {list(want)}",
                                    "re-download the model; the file is inconsistent")
        s = Fp8Stored(t.view(torch.uint8), scale.float(), block)
        stored[name] = s
        out[name] = s.dequantize()
    return out, stored
