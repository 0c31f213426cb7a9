"""The engine's time per decode step on a tiny random Llama (2 layers, hidden 128), where the model forward is
small and the rest of a step (scheduling, laying out the rows, sampling, detokenizing) shows: the host work a
captured GPU step still pays each step. Prints ms per step by batch size, then where one batch-1 run's time goes.

    .venv/bin/python scripts/step_overhead.py [--device cpu|cuda] [--backend torch|cpu|triton] [--steps 300]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.random_model import write_random_model  # noqa: E402
from helpers.tiny_llama import BASE, ids, write_word_tokenizer  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.config import ModelConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_random_model(d, ModelConfig(**BASE), seed=3, std=0.15, norm_std=0.2)
        write_word_tokenizer(d)
        llm = LLM(d, dtype="fp32", device=a.device, attention_backend=a.backend, kv_cache_memory=64 << 20)
        params = SamplingParams(temperature=0.0, max_tokens=a.steps, ignore_eos=True)
        llm.generate([ids(20, 0)], params)  # warm-up (and graph capture on CUDA)
        for b in a.batch:
            t0 = time.perf_counter()
            llm.generate([ids(20, i) for i in range(b)], params)
            dt = time.perf_counter() - t0
            print(f"batch {b:3d}: {dt / a.steps * 1e3:.3f} ms per step ({a.steps / dt:,.0f} steps/s)")
        graphs = llm.engine.runner.graphs
        print("captured decode:", "on" if graphs is not None else "off", graphs.counters if graphs else "")
        prof = cProfile.Profile()
        prof.enable()
        llm.generate([ids(20, 1)], params)
        prof.disable()
        print("\nbatch 1, where the time goes (cumulative):")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(
            r"(llm_engine.py.*\(step\)|model_runner.py.*\((execute|_layout|_prepare)\)|captured.py.*\((run|_fill)\)"
            r"|llama.py.*\(forward\)|scheduler.py.*\(schedule\)|sampler.py|detokenizer.py)")
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
