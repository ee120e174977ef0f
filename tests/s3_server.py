"""A real S3-compatible server on localhost for the tests (moto's, in a thread of the test
process: its objects outlive a stop and a restart on the same port)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.app = DomainDispatcherApplication(create_backend_app)
        self.port = 0
        self.put_delay = 0.0  # seconds each PUT waits: a run slow enough to be cut mid-way
        self.server: Any = None
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        if environ["REQUEST_METHOD"] == "PUT" and self.put_delay:
            time.sleep(self.put_delay)
        return self.app(environ, start_response)

    def start(self) -> None:
        self.server = make_server("127.0.0.1", self.port, self._wsgi, threaded=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop answering and close the socket: new connections are refused."""
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment that points s3fs (through fsspec's configuration) at this server."""
        return {**ENV, "FSSPEC_S3_ENDPOINT_URL": self.url}
