"""Prefill tok/s by prompt length, three sides alternating rep by rep in one process (bench.phases):
tierlm on the "cpu" attention backend, tierlm on the "torch" backend (the older gather + masked SDPA
prefill path) and transformers' generate() (dynamic cache). Greedy, prefix cache off, the engine's
default 512-token chunks. The before/after figure of the long-prompt prefill work.

    .venv/bin/python scripts/prefill_backends.py 512 1024 2048 4096 8191 [--reps 3]
"""
from __future__ import annotations

import argparse

import torch

from tierlm import LLM
from tierlm.bench.phases import EngineSide, PhaseShapes, TransformersSide, measure_paired
from tierlm.bench.transformers_peer import load_peer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lens", type=int, nargs="+", help="prompt lengths (< the model's 8192-token context)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    def engine(backend: str) -> LLM:
        blocks = max((max(a.lens) + 64) // 16 + 8, 8192 // 16)  # holds the whole context: no capped-context warning
        return LLM(enable_prefix_caching=False, num_kv_blocks=blocks, attention_backend=backend)

    new, old = engine("cpu"), engine("torch")
    sides = [EngineSide(new.engine, "cpu"), EngineSide(old.engine, "torch"),
             TransformersSide(load_peer(None, torch.float32), "transformers", cache_implementation=None)]
    shapes = PhaseShapes(prefill_lens=tuple(a.lens), prompt_len=32, new_tokens=2, batches=(1,), reps=a.reps)
    print(f"{'prompt':>8} {'cpu tok/s':>10} {'torch tok/s':>12} {'transformers':>13}  cpu/torch (per-rep range)  "
          "cpu/transformers")

    def show(row) -> None:
        if row.phase != "prefill":
            return
        t = row.tok_per_s
        print(f"{row.prompt_len:>8} {t['cpu']:>10.1f} {t['torch']:>12.1f} {t['transformers']:>13.1f}  "
              f"{row.ratio:.2f}x ({row.ratio_range[0]:.2f}-{row.ratio_range[1]:.2f})          "
              f"{t['cpu'] / t['transformers']:.2f}x", flush=True)

    measure_paired(sides, new.tokenizer, shapes, progress=show)


if __name__ == "__main__":
    main()
