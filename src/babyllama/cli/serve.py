"""`babyllama serve`: an OpenAI-compatible HTTP server (chat completions, completions, models,
health) with continuous batching, and a chat page at `/`."""

from __future__ import annotations

import logging
import os
import socket
import sys

from babyllama.errors import UserError

API_KEY_ENV = "BABYLLAMA_API_KEY"
# Seconds the answers in flight get to finish after Ctrl-C or SIGTERM: a 64-token answer at
# batch 16 on two CPU cores takes a few seconds.
SHUTDOWN_GRACE_S = 30


def add_parser(subparsers) -> None:
    se = subparsers.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a chat page")
    se.add_argument("run", help="a run directory of any stage (or a transformers Llama directory)")
    se.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 "
                         "exposes the server to the network: give it an --api-key)")
    se.add_argument("--port", type=int, default=8000, help="default: %(default)s; 0 picks a free one")
    se.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                    help=f"require `Authorization: Bearer KEY` on /v1/ (default: ${API_KEY_ENV})")
    se.add_argument("--max-batch", type=int, default=16,
                    help="rows decoded together (a request with n choices takes n; default: %(default)s)")
    se.add_argument("--max-queue", type=int, default=64,
                    help="requests that may wait for a row before new ones get 429 (default: %(default)s)")
    se.add_argument("--adapter", action="append", metavar="NAME=DIR", default=[],
                    help="also serve a LoRA run's adapter on RUN (the base) as model NAME; repeatable")
    se.add_argument("--model-name", help="the model id clients use (default: the run folder's name)")
    se.add_argument("--device", default="auto")
    se.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    se.set_defaults(func=cmd_serve)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {spec!r}: give NAME=DIR (the model id clients use, and a LoRA run)")
        if name in adapters:
            raise UserError(f"--adapter {name}: the name is given twice")
        adapters[name] = path
    return adapters


def open_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is one clear line (uvicorn would log
    it and exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> None:
    try:
        import uvicorn
        from uvicorn.logging import DefaultFormatter

        from babyllama.serve.app import create_app
        from babyllama.serve.worker import EngineThread
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): "
                        "pip install 'babyllama[serve]'") from None
    from babyllama.run import Run

    if Run(args.run).is_reward_model():  # before the port is bound and the server announced
        raise UserError(f"{args.run}: is a reward model (it scores answers, it does not generate): "
                        f"use `babyllama score {args.run} --data PAIRS`")
    if args.max_batch < 1 or args.max_queue < 1:
        raise UserError("--max-batch and --max-queue must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0 to 65535 (0 picks a free one)")
    adapters = parse_adapters(args.adapter)
    run = Run(args.run)
    run.model_config()  # a wrong path is one line now, not a failed load behind a started server
    for path in adapters.values():
        Run(path).require_exists()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    sock = open_socket(args.host, args.port)
    # The engine's own lines (ready, load failures, ignored request fields) in uvicorn's format.
    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger = logging.getLogger("babyllama.serve")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_failure(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    engine = EngineThread(args.run, device=args.device, adapters=adapters, max_batch=args.max_batch,
                          max_queue=args.max_queue, on_failure=on_failure)
    app = create_app(engine, model_name=args.model_name, api_key=args.api_key)
    host, port = sock.getsockname()[:2]
    everywhere = host in ("0.0.0.0", "::")
    shown = "127.0.0.1" if everywhere else f"[{host}]" if ":" in host else host
    print(f"serving {args.run} at http://{shown}:{port}/ (chat page) and http://{shown}:{port}/v1 "
          f"(OpenAI API){' on every interface' if everywhere else ''}; loading the model...",
          file=sys.stderr, flush=True)
    # Ctrl-C or SIGTERM lets the answers in flight finish (a second Ctrl-C quits at once).
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    server.run(sockets=[sock])
    if failure:
        raise UserError(failure[0])
