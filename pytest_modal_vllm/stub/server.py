"""`StubServer`: the stub's HTTP plumbing and its OpenAI routes, with a simple cold start.

This is the whole built-in `stub` platform: `/health`, `/v1/models` and `/v1/chat/completions`
answered with the deterministic replies of `replies`, vLLM's `--api-key` check on `/v1/*`, and
`cold_start` seconds unready (the first half refusing connections, then 503, then ready).
`emulator.ModalEmulator` extends it through the hooks marked as such below.

The sockets and threads are `transport.Listener`'s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .replies import (
    CREATED,
    Rule,
    check_chat_request,
    completion_body,
    compose_reply,
    error_body,
    load_script,
    stream_events,
    usage_of,
)
from .transport import Listener, read_body, send, send_events, send_json

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

# Container states: the plain stub boots once (booting, ready); the emulator adds more.
NEW, BOOTING, READY, STOPPED = "new", "booting", "ready", "stopped"

# The routes a ready container serves, with the method each accepts.
_ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}


@dataclass
class Behaviour:
    """How the plain stub behaves. The defaults: ready at once, no key."""

    #: Seconds unready after `start()`: refusing connections for the first half, then 503.
    cold_start: float = 0.0
    #: When set, `/v1/*` requires `Authorization: Bearer <key>` (vLLM's `--api-key`).
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Checked here so that a typo fails where the stub is configured, not as a silent
        # "never ready" endpoint later.
        if self.cold_start < 0:
            raise ValueError(f"cold_start must be >= 0, got {self.cold_start!r}")


@dataclass
class Stats:
    """Counters of what the stub saw; updated under a lock, read with `snapshot()`."""

    #: Requests by path ("/health", "/v1/models", "/v1/chat/completions", ...).
    requests: dict[str, int] = field(default_factory=dict)
    health_requests: int = 0
    #: Container boots (the plain stub boots once).
    cold_starts: int = 0
    #: `time.monotonic()` when the current container became ready; `None` while it is not.
    ready_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chat_requests: int = 0
    #: 401 answers.
    unauthorized: int = 0
    #: TCP connections accepted (keep-alive clients reuse one).
    connections: int = 0
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter."""
        with self._lock:
            return self._snapshot_locked(time.monotonic())

    def _snapshot_locked(self, now: float) -> dict[str, Any]:
        snapshot = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: v.copy() if isinstance(v, (dict, list)) else v for k, v in snapshot.items()}

    def _add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def _count_request(self, key: str) -> None:
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            if key == "/health":
                self.health_requests += 1


@dataclass
class Request:
    """A request as read off the wire (kept whole, so a held one can be answered later)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    arrived: float


class Gone(Exception):
    """The server stopped (answer 503 and close) or died (just drop) while a request waited."""

    def __init__(self, stopped: bool) -> None:
        super().__init__("stopped" if stopped else "dead")
        self.stopped = stopped


class StubServer:
    """A deterministic OpenAI-compatible server on a local port.

    `start()` binds at once (so `port` is valid), then listens and serves from daemon threads;
    `stop()` ends everything. Use it as a context manager in tests.
    """

    #: States in which the clock thread ends.
    FINAL_STATES: ClassVar[tuple[str, ...]] = (STOPPED,)
    #: The type of `stats` (the emulator's bills container seconds too).
    STATS: ClassVar[type[Stats]] = Stats

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "stub",
        script: str | os.PathLike[str] | None = None,
        behaviour: Behaviour | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.model = model
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.rules: list[Rule] = load_script(script) if script is not None else []
        self.stats = self.STATS()
        # One condition guards the container state; every state change notifies it so waiting
        # requests and the clock thread re-check at once instead of polling.
        self._cond = threading.Condition()
        self._state = NEW
        self._listen_at = 0.0
        self._ready_deadline = 0.0
        self._counter = 0
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._stop_event = threading.Event()
        self._listener = Listener(host, port, self._handle, lambda: self.stats._add(connections=1))
        self._clock_thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """`http://HOST:PORT`, the root of `/health`."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """`http://HOST:PORT/v1`, the OpenAI base URL."""
        return f"{self.root_url}/v1"

    @property
    def state(self) -> str:
        """The container: new, booting, ready, stopped (the emulator adds down and dead)."""
        with self._cond:
            return self._state

    def start(self) -> StubServer:
        """Bind now, begin the cold start, serve from daemon threads; return `self`."""
        with self._cond:
            if self._state != NEW:
                raise RuntimeError(f"{type(self).__name__}.start() called twice")
            self.port = self._listener.bind()
            now = time.monotonic()
            # A bound socket that does not listen yet refuses connections on Linux, exactly
            # like vLLM, which binds its port only once the engine is loaded.
            self._listen_at = now + self._refusing_seconds()
            self._enter_locked(BOOTING, now)
            self._tick_locked(now)
            self._clock_thread = threading.Thread(
                target=self._run_clock, name=f"stub-server-clock-{self.port}", daemon=True
            )
            self._clock_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: release waiting requests, close every socket, join threads. Idempotent."""
        with self._cond:
            if self._state == STOPPED:
                return
            self._enter_locked(STOPPED, time.monotonic())
            self._stop_event.set()
        self._listener.close()
        # First stop reading only: idle keep-alive connections see EOF and end, while held
        # requests can still write their 503. Then cut whatever is left.
        for how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._listener.cut(how)
            self._listener.join(1.0)
        if self._clock_thread is not None and self._clock_thread is not threading.current_thread():
            self._clock_thread.join(1.0)

    def make_ready(self) -> None:
        """End the current cold start now (for tests that control time)."""
        with self._cond:
            if self._state != BOOTING:
                return
            now = time.monotonic()
            self._listen_at = min(self._listen_at, now)
            self._ready_deadline = now
            self._tick_locked(now)

    def wait_listening(self, timeout: float | None = None) -> bool:
        """Block until the socket listens (the refusing phase is over); `False` on timeout."""
        return self._listening.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the container is ready; `False` on timeout."""
        return self._ready.wait(timeout)

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            f"state={self._state!r})"
        )

    # -- hooks for the emulator ------------------------------------------------------------

    def _refusing_seconds(self) -> float:
        """How long the first boot refuses connections before it answers 503."""
        return self.behaviour.cold_start / 2

    def _count(self, request: Request) -> None:
        """Count a request in the stats."""
        self.stats._count_request(request.path)

    def _admit(self, h: BaseHTTPRequestHandler, request: Request) -> Request | None:
        """The request to serve now (the emulator may hold it, or serve another), or `None`
        once answered here: 503 while booting. Raises `Gone` once stopped."""
        with self._cond:
            state = self._state
        if state == READY:
            return request
        if state == BOOTING:
            send_json(h, 503, {"error": "starting"})
            return None
        raise Gone(stopped=state == STOPPED)

    def _before_reply(self) -> None:
        """Called once a chat request is accepted, before its reply is composed."""

    def _boot_finished_locked(self, now: float) -> None:
        """The cold start is over: the container is ready."""
        self._enter_locked(READY, now)

    # -- container lifecycle (call with self._cond held) -----------------------------------

    def _enter_locked(self, state: str, now: float) -> None:
        """Move the container to `state`, keeping stats and events in step; notify waiters."""
        self._state = state
        if state == BOOTING:
            self._ready_deadline = now + self.behaviour.cold_start
            self.stats._add(cold_starts=1)
        with self.stats._lock:
            self.stats.ready_at = now if state == READY else None
        if state == READY:
            self._ready.set()
        else:
            self._ready.clear()
        self._cond.notify_all()

    def _tick_locked(self, now: float) -> float | None:
        """Apply due transitions; return seconds until the next one (None: none scheduled)."""
        wait: float | None = None
        if not self._listening.is_set() and self._state not in self.FINAL_STATES:
            if now >= self._listen_at:
                self._listener.listen()
                self._listening.set()
            else:
                wait = self._listen_at - now
        if self._state == BOOTING:
            if now >= self._ready_deadline:
                self._boot_finished_locked(now)
            else:
                remaining = self._ready_deadline - now
                wait = remaining if wait is None else min(wait, remaining)
        return wait

    def _run_clock(self) -> None:
        # One thread drives every timed transition (listen, ready, and the emulator's), so the
        # time a transition is recorded (`stats.ready_at`) is the time it takes effect.
        with self._cond:
            while self._state not in self.FINAL_STATES:
                self._cond.wait(self._tick_locked(time.monotonic()))

    def _next_id(self) -> int:
        with self._cond:
            self._counter += 1
            return self._counter

    # -- request handling ------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        try:
            self._handle_request(h, method)
        except OSError:
            h.close_connection = True  # the client went away
        except Gone as gone:
            h.close_connection = True
            if gone.stopped:
                # If stop() already cut the connection, the closed connection is the answer.
                with contextlib.suppress(OSError):
                    send_json(h, 503, {"error": "stopping"}, close=True)
        except Exception as exc:  # a stub bug: answer it so the test that hit it sees it
            problem = error_body(f"stub server error: {exc!r}", "InternalError", 500)
            try:
                send_json(h, 500, problem)
            except OSError:
                h.close_connection = True

    def _handle_request(self, h: BaseHTTPRequestHandler, method: str) -> None:
        try:
            body = read_body(h)
        except ValueError as bad:  # the stream position is unknown now: close
            send_json(h, 400, error_body(str(bad), "BadRequestError"), close=True)
            return
        request = Request(
            method=method,
            path=h.path.split("?", 1)[0],
            headers={key.lower(): value for key, value in h.headers.items()},
            body=body,
            arrived=time.monotonic(),
        )
        self._count(request)
        target = self._admit(h, request)
        if target is not None:
            self._respond(h, target)

    def _respond(self, h: BaseHTTPRequestHandler, request: Request) -> None:
        """Answer a request the container serves: the API key check, then the routes."""
        path, method = request.path, request.method
        key = self.behaviour.api_key
        v1 = path == "/v1" or path.startswith("/v1/")
        if key is not None and v1 and request.headers.get("authorization") != f"Bearer {key}":
            self.stats._add(unauthorized=1)
            send_json(h, 401, {"error": "Unauthorized"})
            return
        if path not in _ROUTES:
            send_json(h, 404, {"detail": "Not Found"})
        elif method != _ROUTES[path]:
            send_json(h, 405, {"detail": "Method Not Allowed"})
        elif path == "/health":
            send(h, 200)
        elif path == "/v1/models":
            model = {"id": self.model, "object": "model", "created": CREATED, "owned_by": "stub"}
            send_json(h, 200, {"object": "list", "data": [model]})
        else:
            self._chat(h, request)

    def _chat(self, h: BaseHTTPRequestHandler, request: Request) -> None:
        status, payload = check_chat_request(request.body, self.model)
        if status != 200:
            send_json(h, status, payload)
            return
        self.stats._add(chat_requests=1)
        self._before_reply()
        reply = compose_reply(payload, self.rules, self._next_id)
        usage = usage_of(payload["messages"], reply)
        self.stats._add(
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"]
        )
        completion_id = f"chatcmpl-stub-{self._next_id()}"
        model = str(payload["model"])
        if payload.get("stream"):
            options = payload.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            send_events(
                h, stream_events(completion_id, model, reply, usage if include_usage else None)
            )
        else:
            send_json(h, 200, completion_body(completion_id, model, reply, usage))
