"""`tierlm serve`: argument parsing and the command. Importing this module does not import torch.

    tierlm serve --model default --host 127.0.0.1 --port 8000 [--api-key KEY ...] [--prompt-policy P]

API keys come from --api-key (repeatable) and the TIERLM_API_KEYS environment variable (comma-separated);
they are never printed or logged. `python -m tierlm.server` runs the same command.

The engine flags (tierlm.args) include the KV tiers (--host-cache-memory, --disk-cache-dir, --redis-url, ...)
and pinned prefixes (--pin-prefix, --pin-prefix-file). When the server stops, the engine is closed after its
loop has ended, so queued disk/Redis writes land.
"""
from __future__ import annotations

import argparse
import os
import sys

from tierlm.args import add_engine_args, engine_config, format_bytes, parse_bytes
from tierlm.server.server_config import PROMPT_POLICIES, ServerConfig


def _timeout(text: str) -> float | None:
    value = float(text)
    return None if value <= 0 else value


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="model id clients send (default: the --model value)")
    s.add_argument("--api-key", action="append", default=[], dest="api_keys", metavar="KEY",
                   help="accept this API key (repeatable; also TIERLM_API_KEYS=k1,k2). No key: no auth")
    s.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait beyond --max-num-seqs before new requests get 503 (default 256)")
    s.add_argument("--timeout", type=_timeout, default=600.0,
                   help="per-request timeout in seconds, queueing included; 0 disables (default 600)")
    s.add_argument("--prompt-policy", choices=PROMPT_POLICIES, default="reject",
                   help="default for prompts over the context or tierlm_max_prompt_tokens (default reject)")
    s.add_argument("--max-body-bytes", type=parse_bytes, default=8 << 20, help="request body limit (default 8MiB)")
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on shutdown (default 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `tierlm` subparsers; sets func(args) -> int."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)",
                              description="Serve the model behind an OpenAI-compatible API.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def api_keys(args) -> tuple[str, ...]:
    keys = list(args.api_keys)
    keys += [k.strip() for k in os.environ.get("TIERLM_API_KEYS", "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def server_config(args) -> ServerConfig:
    name = args.served_model_name or (args.model if args.model not in (None, "") else "default")
    return ServerConfig(model_name=name, host=args.host, port=args.port, api_keys=api_keys(args),
                        max_queue=args.max_queue, timeout=args.timeout, prompt_policy=args.prompt_policy,
                        max_body_bytes=args.max_body_bytes, graceful_timeout=args.graceful_timeout)


def run(args) -> int:
    config = server_config(args)  # validate before the model loads
    ecfg = engine_config(args)
    from tierlm.engine.async_engine import AsyncEngine
    from tierlm.engine.llm_engine import LLMEngine
    from tierlm.server.app import build_app
    from tierlm.server.launcher import serve_forever

    engine = LLMEngine(ecfg)
    try:
        auth = f"{len(config.api_keys)} API key(s)" if config.api_keys else "no auth"
        tiers = ", ".join(f"{name} {format_bytes(t['capacity_bytes'])}" for name, t in engine.tier_stats().items())
        print(f"tierlm serve: {engine.model_config.model_id} as '{config.model_name}', {engine.num_kv_blocks} KV "
              f"blocks{f' + KV tiers {tiers}' if tiers else ''}, context {engine.max_model_len}, {auth}, on "
              f"http://{config.host}:{config.port}", file=sys.stderr)
        if not serve_forever(build_app(AsyncEngine(engine), config), config, args.log_level):
            print(f"tierlm: error: could not serve on {config.host}:{config.port} (is the port in use? "
                  "pick another with --port)", file=sys.stderr)
            return 2
        return 0
    finally:
        # serve_forever ran the engine loop on this thread and it has ended: nothing steps the engine now.
        # Queued disk/Redis writes land and the tier threads stop.
        engine.close()


def main(argv: list[str] | None = None, *, extra_arguments=None, command=None) -> int:
    """`tierlm serve` as its own program; a consumer (cluster/) adds its flags and its command."""
    from tierlm.core.errors import TierlmError

    p = argparse.ArgumentParser(prog="tierlm serve", description="Serve the model behind an OpenAI-compatible API.")
    add_arguments(p)
    if extra_arguments is not None:
        extra_arguments(p)
    args = p.parse_args(argv)
    try:
        return (command or run)(args)
    except TierlmError as e:
        print(f"tierlm: error: {e}", file=sys.stderr)
        return 2
