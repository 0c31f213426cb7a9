"""Benchmarks. `tierlm bench` (command.py): the load test, see README.md here.
`python -m tierlm.bench.perf`: engine speed on the default model vs transformers."""
