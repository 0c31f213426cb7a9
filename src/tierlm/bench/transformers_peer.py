"""The in-process peer: Hugging Face transformers' generate() on the same model, prompts and dtype.

It loads the HF-format directory the tierlm loader produced (for the default GGUF, the converted
copy in the user cache), so both sides run the same weights. Greedy, EOS ignored
for the speed phases (transformers' default dynamic cache); EOS honoured for the gate prompts.
On CUDA the timings synchronize the device, and generate()'s auto-compile (static cache on CUDA) is
off unless asked for: a first-call torch.compile per shape would be timed as generation.
"""
from __future__ import annotations

import time

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


def _sync(device) -> None:
    """Wait for queued device work, so that wall-clock timings cover it (a no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def run_transformers(model, prompts: list[list[int]], new_tokens: int, cache_implementation: str | None = "static",
                     compile: bool = False) -> dict:
    """Time generate() on equal-length prompts: prefill (one new token), then the whole generation.
    decode_s is the whole generation minus one prefill. cache_implementation None: transformers' default
    dynamic cache (no multi-second first-call setup, which `tierlm bench` cannot afford in --quick).
    compile: let generate() torch.compile the forward where it would (a static cache on CUDA)."""
    import torch

    dev = model.device
    x = torch.tensor(prompts, device=dev)
    kw = dict(do_sample=False, pad_token_id=0)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    if not compile and dev.type != "cpu":
        kw["disable_compile"] = True
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        _sync(dev)
        t1 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(dev)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return {"prefill_s": prefill, "decode_s": (t2 - t1) - prefill, "total_s": t2 - t1,
            "tokens": out[:, x.shape[1]:].tolist()}


def peer_greedy(model, prompts: list[list[int]], max_tokens: int, eos_token_ids: tuple[int, ...]) -> list[list[int]]:
    """Greedy tokens per prompt, one prompt at a time (no padding), stopping at EOS like the engine."""
    import torch

    outs = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p], device=model.device)
            y = model.generate(x, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=list(eos_token_ids) or None)
            toks = y[0, len(p):].tolist()
            for i, t in enumerate(toks):
                if t in eos_token_ids:
                    toks = toks[: i + 1]
                    break
            outs.append(toks)
    return outs
