"""Compare grammar libraries for guided decoding on the default model's tokenizer (issue 15): llguidance, xgrammar,
outlines-core. For each: the time to wrap the tokenizer, to compile a JSON schema and a regex, the per-token mask
time along a valid instance's own tokenization (mean and p99), whether every token of the valid instance is allowed
and EOS is allowed at its end, and whether an invalid instance is rejected.

    pip install llguidance xgrammar outlines-core   # (xgrammar also pulls transformers and triton)
    python scripts/guided_compare.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tierlm.models.loader import load_checkpoint

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "plan": {"enum": ["free", "pro", "team"]}}, "required": ["name", "age", "plan"], "additionalProperties": False}
VALID = '{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines"], "plan": "pro"}'
INVALID = '{"name": "Ada", "age": "thirty"}'
REGEX = r"\d{3}-\d{4}"
REGEX_VALID = "555-1234"


def walk(mask_fn, consume_fn, tokens, vocab):
    """(per-token mask seconds, every token allowed?) along `tokens`; mask_fn() -> bool tensor [vocab]."""
    times, ok = [], True
    for t in tokens:
        t0 = time.perf_counter()
        allowed = mask_fn()
        times.append(time.perf_counter() - t0)
        if not bool(allowed[t]):
            return times, False
        consume_fn(t)
    return times, ok


def bits_to_bool(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1)[:vocab].bool()


def run_llguidance(tok_json: str, vocab: int, eos: int, valid, invalid, regex_valid):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t0
    out = {"tokenizer_s": setup}

    def matcher(grammar):
        return llguidance.LLMatcher(tok, grammar)

    t0 = time.perf_counter()
    g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": True})
    m = matcher(g)
    out["compile_schema_s"] = time.perf_counter() - t0
    bm = lt.allocate_token_bitmask(1, vocab)

    def mask():
        lt.fill_next_token_bitmask(m, bm, 0)
        return bits_to_bool(bm[0], vocab)
    times, ok = walk(mask, m.consume_token, valid, vocab)
    out.update(mask_us_mean=1e6 * statistics.mean(times), mask_us_p99=1e6 * sorted(times)[int(0.99 * (len(times) - 1))],
               valid_accepted=ok and bool(mask()[eos]))
    m2 = matcher(g)
    out["invalid_rejected"] = m2.validate_tokens(invalid) < len(invalid)
    t0 = time.perf_counter()
    r = matcher(llguidance.LLMatcher.grammar_from_regex(REGEX))
    out["compile_regex_s"] = time.perf_counter() - t0
    out["regex_accepted"] = r.validate_tokens(regex_valid) == len(regex_valid)
    return out


def run_xgrammar(tok_dir, vocab: int, eos: int, valid, invalid, regex_valid):
    import transformers
    import xgrammar as xgr

    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    out = {"tokenizer_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    out["compile_schema_s"] = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    bm = xgr.allocate_token_bitmask(1, vocab)

    def mask():
        m.fill_next_token_bitmask(bm)
        return bits_to_bool(bm[0], vocab)
    times, ok = walk(mask, m.accept_token, valid, vocab)
    out.update(mask_us_mean=1e6 * statistics.mean(times), mask_us_p99=1e6 * sorted(times)[int(0.99 * (len(times) - 1))],
               valid_accepted=ok and bool(mask()[eos]))
    m2 = xgr.GrammarMatcher(compiled)
    out["invalid_rejected"] = not all(m2.accept_token(t) for t in invalid)
    t0 = time.perf_counter()
    rc = compiler.compile_regex(REGEX)
    out["compile_regex_s"] = time.perf_counter() - t0
    r = xgr.GrammarMatcher(rc)
    out["regex_accepted"] = all(r.accept_token(t) for t in regex_valid)
    return out


def run_outlines(tok_json: str, vocab: int, eos: int, valid, invalid, regex_valid, tokenizer):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    pieces: dict[str, list[int]] = {}
    for i in range(vocab):
        if i == eos:
            continue
        s = tokenizer.id_to_token(i)
        if s is not None:
            pieces.setdefault(s, []).append(i)
    voc = Vocabulary(eos, pieces)
    out = {"tokenizer_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), voc)
    out["compile_schema_s"] = time.perf_counter() - t0
    guide = Guide(index)

    def mask():
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[torch.tensor(guide.get_tokens(), dtype=torch.long)] = True
        return allowed
    times, ok = walk(mask, guide.advance, valid, vocab)
    out.update(mask_us_mean=1e6 * statistics.mean(times), mask_us_p99=1e6 * sorted(times)[int(0.99 * (len(times) - 1))],
               valid_accepted=ok and bool(mask()[eos]))
    out["invalid_rejected"] = not _advances(Guide(index), invalid)
    t0 = time.perf_counter()
    ri = Index(REGEX, voc)
    out["compile_regex_s"] = time.perf_counter() - t0
    out["regex_accepted"] = _advances(Guide(ri), regex_valid)
    return out


def _advances(guide, tokens) -> bool:
    """Whether an outlines-core guide takes every token (it raises on one its index does not allow)."""
    try:
        for t in tokens:
            guide.advance(t)
    except Exception:
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar", "outlines-core"])
    a = ap.parse_args(argv)
    ckpt = load_checkpoint(None)
    tok, tok_dir = ckpt.tokenizer, ckpt.path
    vocab, eos = ckpt.config.vocab_size, ckpt.config.eos_token_ids[0]
    tok_json = (tok_dir / "tokenizer.json").read_text()
    valid = tok.encode(VALID, add_special_tokens=False)
    invalid = tok.encode(INVALID, add_special_tokens=False)
    regex_valid = tok.encode(REGEX_VALID, add_special_tokens=False)
    results = {}
    for lib in a.libs:
        try:
            if lib == "llguidance":
                results[lib] = run_llguidance(tok_json, vocab, eos, valid, invalid, regex_valid)
            elif lib == "xgrammar":
                results[lib] = run_xgrammar(tok_dir, vocab, eos, valid, invalid, regex_valid)
            else:
                results[lib] = run_outlines(tok_json, vocab, eos, valid, invalid, regex_valid, tok)
        except Exception as exc:  # a library that cannot run here is a result too
            results[lib] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(lib, json.dumps(results[lib]), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
