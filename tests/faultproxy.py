"""A fault-injecting TCP proxy on loopback, for putting an S3 endpoint through an outage.

Clients talk to the proxy; in `pass` mode it forwards bytes to the upstream endpoint
untouched. It can be switched at runtime, or by a trigger on a request line, into:

- `503`: every new connection gets its request read and answered with a 503
  ServiceUnavailable error document, as S3 answers when it sheds load;
- `hang`: connections are accepted and then nothing is ever answered (a black hole:
  the client must time out). Connections open at the switch stall the same way, and
  stay stalled after the outage ends, as a blackholed TCP connection does;
- `refuse`: the listening socket is closed, so connects are refused, and connections
  open at the switch are reset.

Switching into `503` or `refuse` resets the connections that were being forwarded,
so a client's pooled keep-alive connections see the outage too.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
from collections import Counter
from urllib.parse import urlparse

MODES = ("pass", "503", "hang", "refuse")
HOST = "127.0.0.1"
# Remembered across reads, so a request line split over two reads still matches.
_TAIL = 512
_UNAVAILABLE = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n"
    b"<Error><Code>ServiceUnavailable</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def _reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN: to the peer the connection breaks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _pick_port() -> int:
    # Below the kernel's ephemeral range (32768+ on Linux): no outgoing connection can
    # be given this port while the proxy's listener is closed in `refuse` mode, so the
    # port is still free when the proxy listens again.
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class _Forward:
    """One client connection forwarded upstream in `pass` mode."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket):
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self.stalled = False
        self.closed = False

    def run(self) -> None:
        threading.Thread(target=self._downstream, daemon=True).start()
        self._upstream_pump()

    def _upstream_pump(self) -> None:
        tail = b""
        while True:
            try:
                data = self.client.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.stalled:
                continue  # swallowed: a black hole
            if self.proxy._check_trigger(tail + data):
                # The outage starts with this request: it is not forwarded, and this
                # connection was reset or stalled by the switch.
                if self.stalled:
                    continue
                break
            tail = (tail + data)[-_TAIL:]
            try:
                self.upstream.sendall(data)
            except OSError:
                break
        self.close()

    def _downstream(self) -> None:
        while True:
            try:
                data = self.upstream.recv(65536)
            except OSError:
                break
            if not data or self.stalled:
                break
            try:
                self.client.sendall(data)
            except OSError:
                break
        if not self.stalled:
            self.close()

    def stall(self) -> None:
        """Stop answering: the client's socket stays open, and nothing comes back."""
        self.stalled = True
        _reset(self.upstream)

    def reset(self) -> None:
        self.closed = True
        _reset(self.client)
        _reset(self.upstream)

    def close(self) -> None:
        with self.proxy._lock:
            if self.closed:
                return
            self.closed = True
            self.proxy._live.discard(self)
        for s in (self.client, self.upstream):
            try:
                s.close()
            except OSError:
                pass


class FaultProxy:
    """Start with .start(); clients use .url; .set_mode() switches between MODES.

    `faults` counts what the proxy did: "503" answers sent, connections stalled
    ("hang"), and connections reset ("reset": open ones at a switch into 503 or refuse).
    Refused connects never reach the proxy, so they are not counted."""

    def __init__(self, upstream_url: str) -> None:
        parsed = urlparse(upstream_url)
        self.upstream = (parsed.hostname or HOST, parsed.port or 80)
        self.port = _pick_port()
        self.mode = "pass"
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._live: set[_Forward] = set()
        self._hung: list[socket.socket] = []
        self._trigger: tuple[re.Pattern[bytes], str, threading.Event] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self._close_listener()
            live, self._live = list(self._live), set()
            hung, self._hung = self._hung, []
        for f in live:
            f.reset()
        for s in hung:
            _reset(s)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, what: str) -> None:
        with self._lock:
            self.faults[what] += 1

    # --- switching ---------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        with self._lock:
            if mode == self.mode:
                return
            self.mode = mode
            live = list(self._live) if mode != "pass" else []
            if mode != "pass":
                self._live.clear()
            if mode == "refuse":
                self._close_listener()
        for f in live:
            if mode == "hang":
                f.stall()
                with self._lock:
                    self._hung.append(f.client)
                self._count("hang")
            else:
                f.reset()
                self._count("reset")
        if mode == "pass" and self._listener is None:
            self._listen()

    def arm(self, pattern: bytes, mode: str) -> threading.Event:
        """Switch into `mode` when a forwarded request matches `pattern` (a regex over the
        raw bytes a client sends, such as its request line). Fires once; the returned
        event is set when it did. The matching request itself meets the outage."""
        fired = threading.Event()
        with self._lock:
            self._trigger = (re.compile(pattern), mode, fired)
        return fired

    def _check_trigger(self, data: bytes) -> bool:
        with self._lock:
            trigger = self._trigger
            if trigger is None or self.mode != "pass" or not trigger[0].search(data):
                return False
            self._trigger = None
        _, mode, fired = trigger
        self.set_mode(mode)
        fired.set()
        return True

    # --- listening ---------------------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, self.port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"fault proxy could not listen on port {self.port}") from exc
        sock.listen(128)
        sock.settimeout(0.2)
        with self._lock:
            self._listener = sock

    def _close_listener(self) -> None:
        # Called with the lock held. shutdown() wakes an accept() blocked in another
        # thread; close() alone does not.
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            sock = self._listener
            if sock is None:
                self._stopped.wait(0.02)
                continue
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn, self.mode), daemon=True).start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        if mode == "refuse":  # accepted in the instant before the listener closed
            _reset(conn)
            self._count("reset")
        elif mode == "503":
            self._answer_unavailable(conn)
        elif mode == "hang":
            self._count("hang")
            with self._lock:
                self._hung.append(conn)
            self._swallow(conn)
        else:
            self._forward(conn)

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(conn)
            return
        upstream.settimeout(None)
        f = _Forward(self, conn, upstream)
        with self._lock:
            switched = self.mode != "pass"  # while we connected
            if not switched:
                self._live.add(f)
        if switched:
            f.reset()
            return
        f.run()

    @staticmethod
    def _swallow(conn: socket.socket) -> None:
        """Read and drop whatever the client sends until it gives up."""
        while True:
            try:
                if not conn.recv(65536):
                    break
            except OSError:
                break
        try:
            conn.close()
        except OSError:
            pass

    def _answer_unavailable(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            head = self._read_head(conn)
            if head is None:
                return
            method, headers, rest = head
            if "100-continue" not in headers.get("expect", "").lower():
                # Read the body first: closing on unread bytes would send an RST, and the
                # client would see a reset instead of our answer.
                self._drain_body(conn, headers, rest)
            body = b"" if method == "HEAD" else _UNAVAILABLE
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\n"
                b"Content-Type: application/xml\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                b"Connection: close\r\n\r\n" + body
            )
            self._count("503")
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(2)
            while conn.recv(65536):  # until the client closes its side
                pass
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _read_head(conn: socket.socket) -> tuple[str, dict[str, str], bytes] | None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return lines[0].split(" ", 1)[0], headers, rest

    @staticmethod
    def _drain_body(conn: socket.socket, headers: dict[str, str], rest: bytes) -> None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            # No length to go by: read until the client has sent everything and waits.
            conn.settimeout(0.5)
            try:
                while conn.recv(65536):
                    pass
            except TimeoutError:
                pass
            conn.settimeout(10)
            return
        remaining = int(headers.get("content-length") or 0) - len(rest)
        while remaining > 0:
            data = conn.recv(min(remaining, 65536))
            if not data:
                return
            remaining -= len(data)
