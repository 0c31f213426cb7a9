"""A Hugging Face model directory with seeded random weights in the shape of a given config.

For speed measurements where the real weights cannot travel (a GPU box without the default model):
both tierlm (`LLM(model=OUT_DIR)`) and transformers (`AutoModelForCausalLM.from_pretrained(OUT_DIR)`)
load the same weights, so their greedy outputs stay comparable.

    python tests/helpers/random_model.py OUT_DIR --like CONFIG_DIR [--seed 0] [--std 0.05]
                                         [--shape llama-1b|llama-8b] [--context N] [--dtype fp32|bf16]

CONFIG_DIR holds a config.json (e.g. the default model's converted cache entry, whose weights are not
needed) and usually tokenizer.json / tokenizer_config.json / generation_config.json, which are copied.
Weights: matrices and embeddings ~ N(0, std), biases ~ N(0, std), norm weights 1 (+ N(0, norm_std)),
fp32, one model.safetensors. Nothing here needs transformers.

Why std 0.05 by default: at 0.02 (a usual init) a tied-embedding model like SmolLM2-135M is dominated by
its embeddings and greedy decoding repeats one token, which makes the greedy diff against transformers a
weak check; at 0.05 the layers matter and the greedy tokens wander through the vocabulary (and still
match transformers exactly in fp32).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.models.loader.config_json import model_config_from_hf, model_config_to_hf
from tierlm.models.loader.weight_layout import expected_weight_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


DEFAULT_STD = 0.05


def random_weights(config: ModelConfig, seed: int = 0, std: float = DEFAULT_STD, norm_std: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors for `config`, drawn from one CPU generator seeded with `seed`
    (the same seed gives the same bytes on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_weight_shapes(config).items():
        if name.endswith("norm.weight"):  # RMSNorm scales: input/post_attention/final/q/k norms
            t = torch.ones(shape)
            if norm_std:
                t += torch.randn(shape, generator=gen) * norm_std
        else:
            t = torch.randn(shape, generator=gen) * std
        out[name] = t.to(dtype).contiguous()
    return out


def write_random_model(out_dir: str | Path, config: ModelConfig, *, tokenizer_dir: str | Path | None = None,
                       seed: int = 0, std: float = DEFAULT_STD, norm_std: float = 0.0,
                       model_id: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, generation_config.json, model.safetensors (+ tokenizer files from `tokenizer_dir`)
    into `out_dir` (created if needed). Returns out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_id = model_id or f"random-{config.architecture}-seed{seed}"
    config = dataclasses.replace(config, model_id=model_id)
    cfg = model_config_to_hf(config, source="random", seed=seed, std=std, norm_std=norm_std)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / f
            if src.exists():
                shutil.copyfile(src, out / f)
    save_file(random_weights(config, seed, std, norm_std, dtype), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def write_tokenizer(out_dir: str | Path, tokenizer, bos: str = "<s>", eos: str = "</s>", unk: str = "<unk>") -> None:
    """Save a `tokenizers.Tokenizer` as tokenizer.json plus the minimal tokenizer_config.json that both tierlm
    and transformers read (for model directories whose tokenizer is built in code, e.g. in tests)."""
    out = Path(out_dir)
    tokenizer.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")


def config_like(config_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a model directory's config.json (+ generation_config.json eos ids)."""
    d = Path(config_dir)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    eos: list[int] = []
    gen_path = d / "generation_config.json"
    if gen_path.exists():
        value = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
        eos = [int(v) for v in (value if isinstance(value, list) else [value] if value is not None else [])]
    return model_config_from_hf(cfg, where=str(d / "config.json"), model_id=d.name, extra_eos_token_ids=eos)


# Llama-family shapes for GPU measurements (the vocabulary stays --like's, so its tokenizer fits): about 1B and 8B
# parameters (Llama 3.2 1B's and Llama 3.1 8B's layers; with a 49K vocabulary 1.07B and 7.4B).
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                     head_dim=64, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                     head_dim=128, tie_word_embeddings=False),
}


def shaped_like(config: ModelConfig, shape: str, context: int | None = None) -> ModelConfig:
    """`config` (architecture, vocabulary, special tokens) with the layer shape SHAPES[shape], a llama architecture,
    and a context of `context` tokens (default: at least 32K)."""
    ctx = context or max(config.max_position_embeddings, 32768)
    return dataclasses.replace(config, architecture="llama", max_position_embeddings=ctx, rope_theta=500000.0,
                               sliding_window=None, **SHAPES[shape])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--like", required=True, help="a directory with the config.json (and tokenizer files) to copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=DEFAULT_STD, help="std of matrices, embeddings and biases")
    ap.add_argument("--norm-std", type=float, default=0.0, help="spread of the norm weights around 1")
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="layer shape of a Llama of about 1B or 8B parameters (--like still gives vocab + tokenizer)")
    ap.add_argument("--context", type=int, default=None, help="with --shape: max_position_embeddings (default 32K+)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the written weights")
    a = ap.parse_args(argv)
    config = config_like(a.like)
    if a.shape:
        config = shaped_like(config, a.shape, a.context)
    out = write_random_model(a.out_dir, config, tokenizer_dir=a.like, seed=a.seed, std=a.std,
                             norm_std=a.norm_std, model_id=a.model_id,
                             dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    print(f"wrote {out}: {config.architecture}, {config.num_params / 1e6:.1f}M params, seed {a.seed}, std {a.std}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
