"""``trimix serve``: an OpenAI-compatible server for a fused model, with a playground at ``/``."""

from __future__ import annotations

import argparse
import errno
import logging

from trimix.cli.common import add_config_args, config_from_args
from trimix.errors import ConfigError

logger = logging.getLogger(__name__)

EXAMPLE = """example:
  trimix serve -c configs/qwen25_uyghur.yaml --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "ئۇيغۇر تىلى", "max_tokens": 32, "trimix": {"weights": {"large": 0.3, "small_cpt": 0.9}}}'
  # Python: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").completions.create(...)
  # playground: open http://127.0.0.1:8000/ in a browser
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a fused model over an OpenAI-compatible HTTP API (with a playground)",
        description="Load every source of the run once and serve /v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics and a playground at /. Concurrent requests are batched; each request "
        "may change the fusion with the `trimix` extension field.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoded at once")
    p.add_argument("--max-queue", type=int, default=256, help="most waiting requests; beyond it: HTTP 429")
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens when a request gives none (default: the run's generation.max_new_tokens)",
    )
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="the largest max_tokens accepted")
    p.add_argument(
        "--served-model-name",
        "--model-name",
        dest="model_name",
        default="trimix",
        help="the model id /v1/models reports; a request naming another model gets 404 (default: trimix)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError("trimix serve needs FastAPI and uvicorn: pip install 'trimix[serve]'") from exc
    from trimix.decoding import FusedLM
    from trimix.decoding.batcher import ContinuousBatcher
    from trimix.server import Server, create_app

    check_limits(args)
    sock = listen_socket(args.host, args.port)  # a bad or busy port is refused before any model loads
    config = config_from_args(args)
    lm = FusedLM.from_config(config, load_all=True)  # any request may weight any source
    server = Server(
        lm,
        model_name=args.model_name,
        default_max_tokens=args.default_max_tokens,
        max_tokens_cap=args.max_tokens_cap,
        batcher=ContinuousBatcher(lm, max_batch=args.max_batch, max_queue=args.max_queue),
    )
    logger.info("serving %s on http://%s:%d (playground at /)", lm.fusion.describe(), args.host, args.port)
    uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning")).run(sockets=[sock])
    return 0


def check_limits(args: argparse.Namespace) -> None:
    """The server's numeric flags, consistent with each other (refused before anything loads)."""
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--max-tokens-cap", args.max_tokens_cap),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be positive; got {value}")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be a TCP port from 1 to 65535; got {args.port}")
    default = args.default_max_tokens
    if default is not None and not 1 <= default <= args.max_tokens_cap:
        raise ConfigError(
            f"--default-max-tokens must be from 1 to --max-tokens-cap ({args.max_tokens_cap}); got {default}"
        )


def listen_socket(host: str, port: int):
    """The server's listening socket, bound now: a busy port or an address this machine does not have is a
    message naming it, before minutes of model loading."""
    from trimix.server.background import bound_socket

    try:
        return bound_socket(host, port)
    except OSError as exc:
        reason = (
            "is in use by another process"
            if exc.errno == errno.EADDRINUSE
            else f"cannot be used ({exc.strerror or exc})"
        )
        raise ConfigError(
            f"--host {host} --port {port}: the address {reason}; choose another --port or --host"
        ) from None
