"""Golden files: what a config produced on one machine, to compare later runs against.

`--write-golden FILE` records, for the CANDIDATE config as run here, the greedy replies to the greedy prompt
set: the prompt token ids, the generated token ids, each step's top-1 logprob rounded to 3 decimals and a
digest of those rounded values (per prompt and over all), with the model identity (model id, weights
digest, config digest), the config, the torch version and the machine. `--golden FILE` replays the file's
prompts (the same greedy prompts when the sizes match, else the file's own) and compares:

    exact_match          fraction of prompts whose tokens equal the recorded ones
    max_logprob_delta    max |this run's rounded logprob - the recorded one| over the steps where both
                         replies still agree (after a divergence the contexts differ: not comparable)
    digest_match         every rounded value identical (informative)

so a change of machine, driver, torch or format shows as drift like any other. A file recorded on another
model (weights or config digest) is an input error (exit 2), not drift.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

from tierlm.core.errors import InvalidParameterError
from tierlm.drift.metrics import first_divergence

FORMAT = "tierlm-drift-golden/1"


def rounded(logprobs: list[float]) -> list[float]:
    return [round(float(x), 3) + 0.0 for x in logprobs]  # + 0.0: no "-0.0" in the file


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()[:16]


def machine() -> dict:
    import os

    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def identity(engine) -> dict:
    return {"model_id": engine.model_config.model_id, "weights_digest": engine.weights_digest,
            "config_digest": engine.model_config_digest}


def build(engine, side: dict, prompts: list[list[int]], max_tokens: int, replies) -> dict:
    import torch

    rows = []
    for p, r in zip(prompts, replies):
        lps = rounded(r.logprobs or [])
        rows.append({"prompt": list(p), "tokens": list(r.token_ids), "logprobs": lps, "digest": digest(lps)})
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": identity(engine),
            "config": side, "torch": torch.__version__, "machine": machine(), "max_tokens": max_tokens,
            "digest": digest([r["logprobs"] for r in rows]), "prompts": rows}


def write(path: str | Path, doc: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1))
    return p


def read(path: str | Path) -> dict:
    """A golden file's contents; InvalidParameterError when unreadable or not a golden file."""
    p = Path(path)
    fix = "give a file written by `tierlm drift --write-golden`"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidParameterError(f"cannot read golden file {p}: {e.strerror or e}", fix) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"golden file {p} is not JSON ({e})", fix) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise InvalidParameterError(f"golden file {p} has format {got!r}, not {FORMAT}", fix)
    try:
        prompts = [(list(map(int, r["prompt"])), list(map(int, r["tokens"])), list(map(float, r["logprobs"])))
                   for r in doc["prompts"]]
        int(doc["max_tokens"])
        doc["model"]["weights_digest"], doc["model"]["config_digest"]
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidParameterError(f"golden file {p} is incomplete ({e!r} missing or malformed)", fix) from None
    if not prompts:
        raise InvalidParameterError(f"golden file {p} holds no prompts", fix)
    return doc


def check_model(doc: dict, engine, path) -> None:
    """InvalidParameterError when the golden file was recorded on another model than `engine`'s."""
    mine, theirs = identity(engine), doc["model"]
    if (theirs["weights_digest"], theirs["config_digest"]) != (mine["weights_digest"], mine["config_digest"]):
        raise InvalidParameterError(
            f"golden file {path} was recorded on another model ({theirs.get('model_id')}, weights "
            f"{str(theirs['weights_digest'])[:12]}), not {mine['model_id']} (weights {mine['weights_digest'][:12]})",
            "compare against a golden file written for this --model, or write one with --write-golden")


def prompts_of(doc: dict) -> tuple[list[list[int]], int]:
    return [list(r["prompt"]) for r in doc["prompts"]], int(doc["max_tokens"])


def compare(doc: dict, replies, side: dict) -> dict:
    """This run's replies to the golden prompts against the recorded ones (see the module docstring)."""
    rows, exact, worst, per_prompt = doc["prompts"], 0, 0.0, []
    for rec, r in zip(rows, replies):
        lps = rounded(r.logprobs or [])
        div = first_divergence(rec["tokens"], r.token_ids)
        upto = len(rec["tokens"]) if div is None else div
        deltas = [abs(a - b) for a, b in zip(rec["logprobs"][:upto], lps[:upto])]
        delta = round(max(deltas, default=0.0), 6)
        exact += div is None
        worst = max(worst, delta)
        per_prompt.append({"first_divergence": div, "max_logprob_delta": delta, "digest_match": digest(lps) == rec["digest"]})
    recorded = doc["config"] or {}
    return {"prompts": len(rows), "exact_match": exact / len(rows), "max_logprob_delta": worst,
            "digest_match": all(p["digest_match"] for p in per_prompt), "per_prompt": per_prompt,
            "recorded_config": recorded.get("config"), "same_config": recorded.get("config") == side.get("config"),
            "recorded_torch": doc.get("torch"), "recorded_machine": doc.get("machine"), "recorded": doc.get("created")}
