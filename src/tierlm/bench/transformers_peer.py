"""The in-process peer: Hugging Face transformers on the same model, prompts and dtype.

It loads the HF-format directory the tierlm loader produced (for the default GGUF, the converted
copy in the user cache), so both sides run the same weights. The speed phases time it through
`phases.TransformersSide` (greedy, EOS ignored); `peer_greedy` gives its gate tokens (EOS honoured).
"""
from __future__ import annotations

from tierlm.core.errors import TierlmError


def load_peer(model_arg: str | None, dtype, device: str = "cpu"):
    """transformers' AutoModelForCausalLM for `model_arg` (the default model, a .gguf, or a Hugging Face
    directory) on `device`, in eval mode. TierlmError if transformers is absent."""
    try:
        import transformers
    except ImportError:
        raise TierlmError("the transformers peer needs the transformers package",
                          "pip install transformers accelerate, or pass --no-peer") from None
    from tierlm.models.loader import load_checkpoint

    ckpt = load_checkpoint(model_arg)
    path = ckpt.path
    del ckpt  # only its directory is needed (its memory-mapped weights are not)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if str(device) != "cpu":
        model = model.to(device)
    return model.eval()


def peer_greedy(model, prompts: list[list[int]], max_tokens: int | list[int],
                eos_token_ids: tuple[int, ...]) -> list[list[int]]:
    """Greedy tokens per prompt, one prompt at a time (no padding), stopping at EOS like the engine.
    `max_tokens`: one for all, or one per prompt."""
    import torch

    caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    outs = []
    with torch.inference_mode():
        for p, cap in zip(prompts, caps):
            x = torch.tensor([p], device=model.device)
            y = model.generate(x, max_new_tokens=cap, do_sample=False, pad_token_id=0,
                               eos_token_id=list(eos_token_ids) or None)
            toks = y[0, len(p):].tolist()
            for i, t in enumerate(toks):
                if t in eos_token_ids:
                    toks = toks[: i + 1]
                    break
            outs.append(toks)
    return outs
