"""A server running in a thread of this process: for tests, benchmarks and notebooks."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from trimix.server.app import Server, create_app


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port the OS picks), kept open for the server.

    Binding here and handing the socket to uvicorn leaves no gap in which another process could take a
    port that was free when it was chosen (the race of picking a free port and binding it later).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """``trimix serve``'s app under uvicorn in a daemon thread; a context manager.

    Example:
        >>> with BackgroundServer(Server(lm)) as running:  # doctest: +SKIP
        ...     requests.post(running.url + "/v1/completions", json={"prompt": "Hello"})
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.server, self.host = server, host
        self.socket = bound_socket(host, port or 0)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(server), log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, name="trimix-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.uvicorn.started:
            raise RuntimeError(f"the server did not start on {self.url} within {timeout:.0f} s")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting requests, end the batcher thread, and release the port."""
        self.uvicorn.should_exit = True
        self.thread.join(timeout=timeout)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
