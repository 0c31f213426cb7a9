"""Make V4-mini checkpoints whose Engram tables have a given total size (random rows: speed only), to measure
serving with the tables on the device, in host memory and memory-mapped on disk (docs/experiments.md).

    .venv/bin/python scripts/engram_tables.py OUT_DIR 10MB 1GB 4GB [--hidden 576 --layers 8]
    tierlm bench --model OUT_DIR/tables-1GB --configs engram-host engram-mmap ...

Every checkpoint has the same random backbone (the default model's tokenizer, Engram at layers 1 and 5, 16 rows of
32 values per token and layer); only the tables' rows per head differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tierlm.args import parse_bytes
from tierlm.config import EngramConfig, ModelConfig
from tierlm.memory.hashing import layer_hasher
from tierlm.models.export import save_tensors, save_checkpoint
from tierlm.models.loader import load_checkpoint
from tierlm.models.v4mini import V4MiniForCausalLM, table_name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("sizes", nargs="+", help="total table bytes, e.g. 10MB 1GB 4GB")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args(argv)
    tok = load_checkpoint(None).tokenizer
    for size in a.sizes:
        total = parse_bytes(size)
        e = EngramConfig(layers=(1, 5), row_dim=32, heads=8, rows_per_head=max(3, total // (2 * 16 * 32 * 4)))
        cfg = ModelConfig(architecture="v4mini", vocab_size=49152, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                          num_layers=a.layers, num_heads=9, num_kv_heads=3, head_dim=a.hidden // 9,
                          max_position_embeddings=2048, tie_word_embeddings=True, engram=e, bos_token_id=1,
                          eos_token_ids=(2,), model_id=f"v4mini-tables-{size}")
        torch.manual_seed(0)
        with torch.device("meta"):
            model = V4MiniForCausalLM(cfg)
        model.to_empty(device="cpu")
        model.init_rope("cpu")
        for name, p in model.named_parameters():
            if not name.startswith("engram_tables."):
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        tables = model.engram_tables
        model.engram_tables = torch.nn.ParameterDict()  # written below, one at a time (they can be large)
        model.tables = {}
        out = Path(a.out) / f"tables-{size}"

        model.export_extra = lambda: ({f"model.layers.{i}.engram.{n}": t.detach()
                                       for i in model.engram_layers for n, t in model.engram[str(i)].named_parameters()},
                                      {})
        save_checkpoint(model, tok, out)
        g = torch.Generator().manual_seed(1)
        rows = {table_name(i): torch.randn(layer_hasher(e, i, 49152).total_rows, e.row_dim, generator=g)
                for i in e.layers}
        save_tensors(rows, out / "engram.safetensors")
        del tables, rows
        print(f"{out}: tables {(out / 'engram.safetensors').stat().st_size / 2**20:,.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
