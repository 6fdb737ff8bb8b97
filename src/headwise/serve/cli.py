"""``headwise serve``: the OpenAI-compatible server on uvicorn (see :mod:`headwise.serve`)."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path

from headwise.checks import add_dtype_option, add_threads_option
from headwise.errors import HeadwiseError
from headwise.registry import DEFAULT_MODEL

UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GiB"``, ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in UNITS:
        raise HeadwiseError(f"--cache-bytes: cannot read '{text}' as a size (e.g. 2GiB, 512MiB, 1000000)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def check_port(host: str, port: int) -> None:
    """Refuse a port outside 1..65535, or one that cannot be bound now (in use, or not allowed)."""
    if not 0 < port < 65536:
        raise HeadwiseError(f"--port must be in 1..65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise HeadwiseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def cmd_serve(args: argparse.Namespace) -> None:
    from headwise.checks import set_threads
    from headwise.serve.engine import Compression

    options = tuple([*args.option, f"profile={args.profile}"] if args.profile else args.option)
    compression = Compression(args.policy, args.ratio, args.budget, options, args.select)
    compression.plan()  # refuse bad compression arguments before the model loads
    if args.served_name is not None and not args.served_name.strip():
        raise HeadwiseError("--served-name must not be empty")
    if args.context_threshold < 1:
        raise HeadwiseError(f"--context-threshold must be at least 1 token, got {args.context_threshold}")
    if args.max_queue < 1:
        raise HeadwiseError(f"--max-queue must be at least 1 request, got {args.max_queue}")
    cap = parse_bytes(args.cache_bytes)
    contexts_dir = Path(args.contexts_dir) if args.contexts_dir else None
    if contexts_dir is not None:
        if contexts_dir.exists() and not contexts_dir.is_dir():
            raise HeadwiseError(f"--contexts-dir '{contexts_dir}' is a file, not a folder")
        try:
            contexts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HeadwiseError(f"cannot create --contexts-dir '{contexts_dir}': {exc.strerror or exc}") from exc
        if not os.access(contexts_dir, os.W_OK):
            raise HeadwiseError(f"--contexts-dir '{contexts_dir}' is not writable")
    set_threads(args.threads)
    check_port(args.host, args.port)

    import uvicorn

    from headwise.models import load_model
    from headwise.serve.app import Server
    from headwise.serve.contexts import ContextCache
    from headwise.serve.engine import Engine
    from headwise.serve.metrics import Metrics

    lm = load_model(args.model, dtype=args.dtype)
    engine = Engine(lm, compression, ContextCache(cap), Metrics(), max_queue=args.max_queue,
                    contexts_dir=contexts_dir)
    name = args.served_name or lm.name
    server = Server(engine, name, args.context_threshold)
    engine.start()
    print(f"headwise serve: {lm.name} as '{name}', contexts {compression.plan().describe()}, "
          f"on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server that compresses each long context once")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--policy", default="full", help="compression policy of the contexts (default full)")
    p.add_argument("--ratio", type=float, default=None, help="fraction of a context's KV cache removed, in [0, 1)")
    p.add_argument("--budget", type=int, default=None, help="KV tokens kept per head (instead of --ratio)")
    p.add_argument("--profile", default=None, help="head profile for --policy headwise (from `headwise profile`)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="policy or plan option, e.g. -o window=64")
    p.add_argument("--select", default=None, metavar="RULE[:KEY=VALUE,...]",
                   help="decode-time selection over each request's cache, e.g. quest:budget=256")
    p.add_argument("--served-name", default=None,
                   help="the model's name in requests and in /v1/models (default: the model's own name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--context-threshold", type=int, default=256,
                   help="tokens a system or first user message needs to be cached and compressed as a context "
                        "(default 256)")
    p.add_argument("--cache-bytes", default="2GiB",
                   help="memory cap of the cached contexts, least recently used out first (default 2GiB)")
    p.add_argument("--contexts-dir", default=None,
                   help="save each new context here as safetensors, and load those saved by the same model and "
                        "plan at start")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model; more get HTTP 429 (default 16)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    add_threads_option(p)
    add_dtype_option(p)
    p.set_defaults(func=cmd_serve)
