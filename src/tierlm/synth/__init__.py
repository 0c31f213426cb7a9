"""`tierlm synth`: synthetic-data jobs (job.py), run in-process or against a URL (runner.py), checked, deduplicated
and journaled for resume (check.py, dedup.py, journal.py), scanned (scans.py: pii.py, leakage.py, membership.py),
reported with their cost (report.py) and compared across engine configs (compare.py)."""
