"""`tierlm bench` driven in-process, as its command line would: parse the argv, then run it."""
from __future__ import annotations

import argparse

from tierlm.bench.command import add_parser


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tierlm")
    add_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["bench", *argv])
    a.argv = ["bench", *argv]
    return a


def run(argv: list[str]) -> int:
    a = parse(argv)
    return a.func(a)
