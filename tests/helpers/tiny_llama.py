"""A tiny random Llama (2 layers, 512-word vocabulary) with a word-level tokenizer, written in code: the model the
device tests (tests/engine/test_cuda.py, test_captured_decode.py) run without the default model or a download."""
from __future__ import annotations

import torch

from helpers.random_model import write_tokenizer

VOCAB = 512
EOS = 2
BASE = dict(architecture="llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(EOS,))


def ids(n: int, seed: int) -> list[int]:
    """n token ids in [3, VOCAB) (no special tokens), the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def write_word_tokenizer(d) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    write_tokenizer(d, tok)
