"""An OpenAI-compatible HTTP server over a fused model, with a playground (see :mod:`trimix.server.app`)."""

from trimix.server.app import Server, create_app
from trimix.server.background import BackgroundServer

__all__ = ["BackgroundServer", "Server", "create_app"]
