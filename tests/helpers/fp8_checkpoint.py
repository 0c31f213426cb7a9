"""An FP8 checkpoint in Hugging Face layout made from a model directory, stored the way DeepSeek-V3 and the Qwen3
FP8 releases store theirs: every linear's `weight` in float8_e4m3fn with `weight_scale_inv` fp32 per 128 x 128
block (amax / 448), config.json's quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128]};
the embedding, norms (and an untied head) fp32. For tests and benchmarks of tierlm's FP8 checkpoint path, since
no FP8 checkpoint of the default model is published.

    python tests/helpers/fp8_checkpoint.py OUT_DIR [--like MODEL_DIR]   (default: the default model's directory)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_fp8_checkpoint(src: str | Path, out: str | Path, quant_config: dict | None = QCONFIG,
                         drop_scale: str | None = None, bad_scale: str | None = None) -> Path:
    """`src` re-saved as an FP8 checkpoint in `out`. drop_scale / bad_scale: a weight whose scale tensor is left out
    / saved one block column short (broken checkpoints for the loader's errors)."""
    from safetensors.torch import save_file

    from tierlm.models.loader import load_checkpoint
    from tierlm.quant.weights import fp8_block_scales

    src, out = Path(src), Path(out)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("manifest.json", INDEX):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    if quant_config is not None:
        cfg["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for name, w in load_checkpoint(src).weights.items():
        if name.endswith("_proj.weight"):
            s = fp8_block_scales(w, False)
            full = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
            tensors[name] = (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn)
            if name != drop_scale:
                tensors[name + "_scale_inv"] = s[:, :-1].contiguous() if name == bad_scale else s
        else:
            tensors[name] = w.float().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    return out


INDEX = "model.safetensors.index.json"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--like", default=None, help="model directory or GGUF to convert (default: the default model)")
    args = ap.parse_args()
    from tierlm.models.loader import load_checkpoint

    print(write_fp8_checkpoint(load_checkpoint(args.like or "default").path, args.out))
