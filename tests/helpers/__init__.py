"""Helpers the tests share: seeded random model directories, deliberate engine bugs for the gate tests."""
