"""`tierlm serve --replicas N`: start (or join) a Ray cluster, deploy the replicas and the ingress, serve until
SIGINT/SIGTERM, then shut Serve down. See cluster/deploy.py for the layout."""
from __future__ import annotations

import os
import signal
import sys
import threading

from tierlm.core.errors import InvalidParameterError

RAY_PIN = "ray[serve]==2.60.0"


def run(args, config, ecfg) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InvalidParameterError("--replicas runs the replicas on Ray Serve, which is not installed",
                                    f"pip install '{RAY_PIN}' (or pip install 'tierlm[cluster]')") from None
    from tierlm.cluster.deploy import deploy
    from tierlm.cluster.routing import Router

    Router(args.routing, args.routing_imbalance, args.routing_min_match)  # bad flags fail here, not inside Ray
    if args.replica_gpus < 0:
        raise InvalidParameterError(f"--replica-gpus {args.replica_gpus}", "give 0 (CPU replicas) or more")
    threads = args.replica_threads
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning")
    else:
        cpus = max(os.cpu_count() or 1, args.replicas * (threads or 1))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        deploy(ecfg, config, args.replicas, threads, args.routing, imbalance=args.routing_imbalance,
               min_match=args.routing_min_match, gpus=args.replica_gpus)
        where = args.ray_address or "a local Ray cluster"
        print(f"tierlm serve: {args.replicas} replica(s) on {where}, routing {args.routing}, on "
              f"http://{config.host}:{config.port}", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        return 0
    finally:
        serve.shutdown()
        try:  # the board is detached (it outlives a replica); it goes with the deployment
            from tierlm.cluster.deploy import BOARD, BOARD_NAMESPACE

            ray.kill(ray.get_actor(BOARD, namespace=BOARD_NAMESPACE))
        except ValueError:  # never made (deploy failed early)
            pass
        ray.shutdown()
