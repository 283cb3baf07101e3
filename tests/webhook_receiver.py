"""A real webhook receiver for tests: an http.server thread on 127.0.0.1 that checks
every request with farm's own `verify` and answers from a script of responses."""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from farm.webhooks import VerificationError, verify
from tests.services import free_port


@dataclass
class Received:
    at: float  # time.monotonic() when the request arrived
    path: str
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any] | None  # None when verification failed
    error: str | None
    answered: int


@dataclass
class Receiver:
    """`script` answers the first requests in order, as (status, headers); then 200.
    Give `port` to come up later on an address senders already use."""

    secret: str
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    path: str = "/hook"
    tls: ssl.SSLContext | None = None  # serve HTTPS with this server context
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    payload, error = verify(receiver.secret, self.headers, body), None
                except VerificationError as exc:
                    payload, error = None, str(exc)
                with receiver.lock:
                    n = len(receiver.received)
                    status, extra = receiver.script[n] if n < len(receiver.script) else (200, {})
                    if error:
                        status, extra = 400, {}
                    receiver.received.append(
                        Received(time.monotonic(), self.path, headers, body, payload, error, status)
                    )
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.received)} webhook requests arrived, wanted {count}")

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
