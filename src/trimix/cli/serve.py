"""``trimix serve``: an OpenAI-compatible server for a fused model, with a playground at ``/``."""

from __future__ import annotations

import argparse
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
    p.add_argument("--model-name", default="trimix", help="the id /v1/models reports")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError("trimix serve needs FastAPI and uvicorn: pip install 'trimix[serve]'") from exc
    from trimix.decoding import FusedLM
    from trimix.decoding.batcher import ContinuousBatcher
    from trimix.server import Server, create_app

    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--port", args.port),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be positive; got {value}")
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
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0
