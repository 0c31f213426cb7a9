"""`tierlm drift`: numeric drift of a candidate engine config against a reference (see command.py).

    metrics.py     pure torch/str functions: KL, top-1 agreement, perplexity, first divergence, the safety
                   decision rule (no engine imports)
    thresholds.py  limits, their defaults and why, TOML overrides, the checks (stdlib only)
    sides.py       CONFIG strings -> engine configs
    inputs.py      passages, greedy/safety prompts (data/), passkey needles
    suite.py       what each side runs, and the comparison
    kv_error.py    per-layer K/V round-trip error of an FP8 candidate
    golden.py      golden files (record / compare)
    report.py      table, JSON, PNG
    command.py     the argparse subcommand

Importing this package imports nothing else.
"""
