"""`tierlm serve --replicas N`: the serve command's replica flags and its dispatch, to one in-process server
(server/command.py) or to engine replicas on Ray Serve (cluster/launch.py). `python -m tierlm.cluster` runs the
same as `tierlm serve`. Importing this module does not import torch or Ray."""
from __future__ import annotations

import argparse

from tierlm.server import command as server_command


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("replicas (Ray Serve; tierlm/cluster)")
    c.add_argument("--replicas", type=int, default=0,
                   help="run N engine replicas on Ray Serve behind this endpoint (0: one in-process engine)")
    c.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    c.add_argument("--replica-threads", type=int, default=None, help="CPU threads (Ray CPUs) per replica")
    c.add_argument("--replica-gpus", type=float, default=0.0,
                   help="GPUs (Ray GPUs, fractions allowed) per replica; > 0 runs each replica's engine on CUDA")
    c.add_argument("--routing", default="cache", help="cache (longest prefix, then session, then load), "
                                                      "least_loaded or round_robin")
    c.add_argument("--routing-min-match", type=float, default=0.5,
                   help="cache routing: follow a known prefix only when it covers at least this fraction of the "
                        "prompt (default 0.5)")
    c.add_argument("--routing-imbalance", type=int, default=4,
                   help="cache routing: leave the preferred replica when it has more than this many requests "
                        "above the least loaded one (default 4)")


def run(args) -> int:
    if not args.replicas:
        return server_command.run(args)
    if args.replicas < 1:
        from tierlm.core.errors import InvalidParameterError

        raise InvalidParameterError(f"--replicas {args.replicas}", "give 1 or more (0: no Ray)")
    from tierlm.args import engine_config
    from tierlm.cluster.launch import run as run_cluster

    config = server_command.server_config(args)  # validate before Ray starts
    return run_cluster(args, config, engine_config(args))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` (the server's flags and these) on the `tierlm` subparsers; sets func(args) -> int."""
    p = server_command.add_parser(subparsers)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    return server_command.main(argv, extra_arguments=add_arguments, command=run)
