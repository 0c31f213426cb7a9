"""`tierlm train CONFIG.yaml`: pre-train a small Llama or V4-mini model (train/trainer.py).

    tierlm train configs/v4mini-shakespeare.yaml --out runs/v4mini
    torchrun --nproc_per_node 2 -m tierlm.cli train CONFIG.yaml --out runs/dp2      # data-parallel
    tierlm serve --model runs/v4mini/model                                          # serve what it trained

A killed run resumes where its last checkpoint left it when started again with the same --out (pass --fresh
to start over); bad input (a missing corpus, unknown config keys, impossible shapes, another config in --out)
is one line naming the fix, exit 2. Importing this module does not import torch.
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="pre-train a small Llama / V4-mini model on offline corpora",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the training config (YAML; see tierlm/train/config.py for every key)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--fresh", action="store_true", help="discard what --out holds and start over")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable later)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="write the run summary here")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(a) -> int:
    import dataclasses
    from pathlib import Path

    from tierlm.train.config import load_config
    from tierlm.train.trainer import train

    cfg = load_config(a.config)
    if a.seed is not None:
        cfg = dataclasses.replace(cfg, seed=a.seed)
    out = Path(a.out) if a.out else Path("runs") / Path(a.config).stem
    summary = train(cfg, out, fresh=a.fresh, max_steps=a.max_steps, progress=not a.no_progress)
    if summary:
        val = f", validation loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f})" if summary["val_loss"] else ""
        tok_s = f", {summary['tokens_per_s']:,.0f} tok/s" if summary["tokens_per_s"] else ""
        print(f"{'trained' if summary['finished'] else 'stopped at'} step {summary['steps']}/{summary['total_steps']}: "
              f"{summary['tokens']:,} tokens, train loss {summary['train_loss']:.4f}{val}{tok_s}")
        if summary["model_dir"]:
            print(f"model: {summary['model_dir']}  (tierlm serve --model {summary['model_dir']})")
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
