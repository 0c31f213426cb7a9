"""A tiny V4-mini checkpoint with random weights (the default model's tokenizer), for engine and bench tests."""
from __future__ import annotations

from pathlib import Path

import torch

from tierlm.config import EngramConfig, ModelConfig

VOCAB = 49152  # the default model's tokenizer


def tiny_config(**engram) -> ModelConfig:
    e = dict(layers=(0, 2), row_dim=8, rows_per_head=509, heads=2)
    e.update(engram)
    return ModelConfig(architecture="v4mini", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                       tie_word_embeddings=True, engram=EngramConfig(**e), bos_token_id=1, eos_token_ids=(2,),
                       model_id="v4mini-test")


def random_model(cfg: ModelConfig, seed: int = 0):
    from tierlm.models.v4mini import V4MiniForCausalLM

    torch.manual_seed(seed)
    model = V4MiniForCausalLM(cfg)
    model.init_rope("cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # the conv too: a missing conv state changes the tokens
    return model.eval()


def write_v4mini(out: Path, cfg: ModelConfig | None = None, seed: int = 0):
    """(the model, the checkpoint directory)."""
    from tierlm.models.export import save_checkpoint
    from tierlm.models.loader import load_checkpoint

    model = random_model(cfg or tiny_config(), seed)
    return model, save_checkpoint(model, load_checkpoint(None).tokenizer, out)
