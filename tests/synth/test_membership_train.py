"""The memorization figure on a model `tierlm train` trained on a known split: a tiny Llama trained for several
epochs on a small Shakespeare slice scores its training documents above its held-out ones (the attack AUC of
`tierlm synth scan membership --train-run`)."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tierlm.synth import membership as mi

MEMORIZER = {
    "seed": 0,
    "model": {"family": "llama", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_position_embeddings": 128},
    "tokenizer": {"kind": "bpe", "vocab_size": 384},
    "data": {"corpora": [{"name": "shakespeare", "source": "shakespeare"}], "max_chars": 24_000,
             "validation_fraction": 0.3, "doc_tokens": 96},
    "curriculum": {"difficulty": "none", "stages": [{"name": "main", "tokens": 98_304, "seq_len": 64}]},
    "optim": {"lr": 5.0e-3, "batch_size": 8, "warmup_steps": 5},
    "eval": {"every": 64, "batches": 2, "seq_len": 64, "batch_size": 8},
    "checkpoint": {"every": 192, "keep": 1},
}


def test_training_members_outscore_held_out_documents(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(MEMORIZER))
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "train", str(tmp_path / "m.yaml"), "--out",
                        str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    members, nonmembers = mi.run_split(tmp_path / "run", limit=40)
    assert len(members) == 40 and len(nonmembers) >= 20
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "synth", "scan", "membership", "--train-run",
                        str(tmp_path / "run"), "--limit", "40", "--json", str(tmp_path / "mia.json")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "mia.json").read_text())
    assert result["split"]["members"] == 40
    assert result["auc"]["loss"] > 0.8 and result["auc"]["min_k"] > 0.7, result["auc"]
