"""The stub's HTTP plumbing: a threaded HTTP/1.1 listener and the helpers that read and answer.

`Listener` binds at once and listens later (a bound socket that does not listen refuses
connections, as vLLM does while its engine loads), serves each connection from a daemon thread,
and tracks the connections so that a stop can cut them. `http.server` is imported when a
listener binds, so that importing the stub from the pytest plugin costs next to nothing.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The largest request body read; a larger one is answered 400.
MAX_BODY = 16 * 1024 * 1024
#: `handle(handler, method)`: answers one request.
Handle = Callable[["BaseHTTPRequestHandler", str], None]


class Listener:
    """A threaded HTTP/1.1 server on (host, port) that calls `handle` for every request."""

    def __init__(
        self, host: str, port: int, handle: Handle, on_connection: Callable[[], None]
    ) -> None:
        self.host = host
        self.port = port
        self._requested_port = port
        self._handle = handle
        self._on_connection = on_connection
        self._httpd: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._threads: list[threading.Thread] = []

    def bind(self) -> int:
        """Bind the socket (not listening yet: connections are refused); return the port."""
        httpd = self._make_httpd()
        try:
            httpd.server_bind()
        except OSError:
            httpd.server_close()
            raise
        self._httpd = httpd
        self.port = int(httpd.socket.getsockname()[1])
        return self.port

    def listen(self) -> None:
        """Accept connections from now on, served from daemon threads."""
        assert self._httpd is not None
        self._httpd.server_activate()
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"stub-server-{self.port}",
            daemon=True,
        )
        self._serve_thread.start()

    def close(self) -> None:
        """Stop accepting and close the listening socket; open connections go on."""
        self._closed = True
        httpd = self._httpd
        if httpd is None:
            return
        # `shutdown()` waits for `serve_forever` to return; it would wait forever if the loop
        # never started (still in the refusing phase), so only call it when it runs.
        if self._serve_thread is not None:
            httpd.shutdown()
            if self._serve_thread is not threading.current_thread():
                self._serve_thread.join(1.0)
        httpd.server_close()

    def cut(self, how: int) -> None:
        """Shut every open connection down (`socket.SHUT_RD`, `SHUT_RDWR`)."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            _shutdown(conn, how)

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds in all for the connection threads to end."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _track(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections[conn] = thread
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        self._on_connection()
        if self._closed:
            # Accepted in the instant close() ran: do not let it outlive the stop.
            _shutdown(conn, socket.SHUT_RDWR)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def _make_httpd(self) -> ThreadingHTTPServer:
        # Imported here, not at module level: `http.server` pulls in `http.client`, `email` and
        # `ssl`, which the plugin must not pay for when no stub is started.
        import socketserver
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        listener = self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn and the Modal proxy
            # Headers and body are separate writes: with Nagle on, a keep-alive client waits
            # for a delayed ACK (40 ms) on every answer.
            disable_nagle_algorithm = True
            server_version = "pytest-modal-vllm-stub"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:
                pass  # silent: a test run must not get one stderr line per request

        for verb in ("GET", "POST", "PUT", "DELETE", "PATCH"):  # do_GET, ...: all to `handle`
            setattr(Handler, f"do_{verb}", lambda h, verb=verb: listener._handle(h, verb))

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            # The stub joins its own threads with a timeout; the mixin would join forever.
            block_on_close = False
            request_queue_size = 128
            # Port 0: keep the reserved port exclusive while it is bound but not listening.
            allow_reuse_address = listener._requested_port != 0

            def server_bind(self) -> None:
                # HTTPServer.server_bind also calls socket.getfqdn(), a DNS lookup that can
                # take seconds; the stub has no use for the name.
                socketserver.TCPServer.server_bind(self)
                self.server_name = listener.host
                self.server_port = int(self.socket.getsockname()[1])

            def process_request(self, request: Any, client_address: Any) -> None:
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name=f"stub-server-conn-{listener.port}",
                    daemon=True,
                )
                listener._track(request, thread)
                thread.start()

            def shutdown_request(self, request: Any) -> None:
                listener._untrack(request)
                super().shutdown_request(request)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client hanging up is normal; stub bugs are answered as 500 instead

        return Server((self.host, self._requested_port), Handler, bind_and_activate=False)


def _shutdown(conn: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # already closed by its handler
        conn.shutdown(how)


def read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body (Content-Length or chunked); `ValueError` when it cannot be read."""
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while True:
            line = h.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError("bad chunked encoding") from None
            if size == 0:
                while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise ValueError("request body too large")
            parts.append(h.rfile.read(size))
            h.rfile.readline(1024)
    raw_length = h.headers.get("Content-Length")
    if raw_length is None:
        return b""
    try:
        length = int(raw_length)
    except ValueError:
        length = -1
    if length < 0 or length > MAX_BODY:
        raise ValueError("bad Content-Length")
    return h.rfile.read(length) if length else b""


def send(
    h: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    close: bool = False,
) -> None:
    """Answer with a whole body; `close` ends the connection after it."""
    h.send_response(status)
    if content_type is not None:
        h.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(body)))
    if close:
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    if body:
        h.wfile.write(body)
    h.wfile.flush()


def send_json(h: BaseHTTPRequestHandler, status: int, body: object, *, close: bool = False) -> None:
    """Answer with a JSON body."""
    send(h, status, json.dumps(body).encode(), "application/json", close=close)


def send_text(h: BaseHTTPRequestHandler, status: int, text: str) -> None:
    """Answer with a plain text body."""
    send(h, status, text.encode(), "text/plain; charset=utf-8")


def send_events(h: BaseHTTPRequestHandler, events: Iterable[object]) -> None:
    """Answer with server-sent events, one `data:` line each as JSON, then `data: [DONE]`."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream; charset=utf-8")
    h.send_header("Cache-Control", "no-cache")
    # Chunked transfer encoding keeps the connection reusable after the stream ends.
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    for data in [*(json.dumps(event).encode() for event in events), b"[DONE]"]:
        line = b"data: " + data + b"\n\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        h.wfile.flush()
    h.wfile.write(b"0\r\n\r\n")
    h.wfile.flush()


def reset(h: BaseHTTPRequestHandler) -> None:
    """Reset the connection without answering."""
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN: the client sees
    # "connection reset by peer", as when a proxy or container drops a request.
    h.close_connection = True
    with contextlib.suppress(OSError):
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.connection.close()
