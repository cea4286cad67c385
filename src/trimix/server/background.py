"""A server running in a thread of this process: for tests, benchmarks and notebooks."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from trimix.server.app import Server, create_app


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """``trimix serve``'s app under uvicorn in a daemon thread; a context manager.

    Example:
        >>> with BackgroundServer(Server(lm)) as running:  # doctest: +SKIP
        ...     requests.post(running.url + "/v1/completions", json={"prompt": "Hello"})
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.server, self.host = server, host
        self.port = port or free_port(host)
        config = uvicorn.Config(create_app(server), host=host, port=self.port, log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, name="trimix-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.uvicorn.started and time.time() < deadline:
            time.sleep(0.05)
        if not self.uvicorn.started:
            raise RuntimeError(f"the server did not start on {self.url} within {timeout:.0f} s")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting requests, end the batcher thread, and release the port."""
        self.uvicorn.should_exit = True
        self.thread.join(timeout=timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
