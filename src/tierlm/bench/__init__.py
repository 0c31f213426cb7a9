"""Benchmarks. `python -m tierlm.bench.perf`: engine speed on the default model vs transformers."""
