"""A deterministic OpenAI-compatible HTTP server, with switches for every readiness behaviour.

One implementation serves three purposes:

1. the built-in `stub` platform (started in-process on loopback);
2. the fake endpoints of the plugin's own test suite: refusing, answering 503, holding requests,
   redirecting with 303, requiring an API key or Modal proxy credentials, failing at random,
   dying, hanging on `/health`;
3. a Modal-like emulator: a "container" that boots (cold start), scales to zero after an idle
   window, boots again on the next request, and counts billed seconds.

Replies are deterministic: an echo of the last message, a rule from a TOML script file, a JSON
document generated from a requested JSON schema, or a tool call. Standard library only; the
HTTP machinery (`http.server`) is imported when a server starts, so that importing this module
from the pytest plugin costs next to nothing.

Run it in the foreground with `python -m pytest_modal_vllm.stub_server --help`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import TracebackType

__all__ = [
    "COLD_STYLES",
    "FAIL_MODES",
    "Behaviour",
    "Rule",
    "Stats",
    "StubServer",
    "load_script",
    "main",
    "sample_from_schema",
]

COLD_STYLES = ("refuse", "503", "hold", "refuse-then-503")
FAIL_MODES = ("503", "reset")
#: The `created` timestamp of every object the stub returns: fixed, so answers are reproducible.
CREATED = 1_700_000_000
PROXY_AUTH_MISSING = "modal-http: missing credentials for proxy authorization"
PROXY_AUTH_INVALID = "modal-http: invalid credentials for proxy authorization"
_MAX_BODY = 16 * 1024 * 1024
_RESULT_PREFIX = "/__result/"


# --------------------------------------------------------------------------------------------
# Configuration and counters
# --------------------------------------------------------------------------------------------


@dataclass
class Behaviour:
    """How the stub behaves: cold start, auth, faults, delays. The defaults: ready at once."""

    #: Seconds unready after `start()` (and after each scale-to-zero wake-up).
    cold_start: float = 0.0
    #: "refuse" | "503" | "hold" | "refuse-then-503" (refuse the first half, then 503).
    #: Refusing applies to the first boot only; a wake-up after scale-to-zero answers 503
    #: (or holds, with "hold"), as Modal's always-up proxy does.
    cold_style: str = "refuse-then-503"
    #: A request held longer than this gets `303 See Other` to `/__result/<id>` (Modal: 150 s).
    redirect_after: float | None = None
    #: When set, `/v1/*` requires `Authorization: Bearer <key>` (vLLM's `--api-key`).
    api_key: str | None = field(default=None, repr=False)
    #: (key, secret): every path requires `Modal-Key`/`Modal-Secret` headers (Modal proxy auth).
    proxy_auth: tuple[str, str] | None = field(default=None, repr=False)
    #: Modal emulator: the container stops after this many idle seconds.
    scaledown_window: float | None = None
    #: Fraction of `/v1/*` requests that fail at random (seeded by `seed`).
    fail_rate: float = 0.0
    #: "503" (answer 503) | "reset" (reset the connection without answering).
    fail_mode: str = "503"
    seed: int = 0
    #: Extra seconds before answering each `/v1/chat/completions` request.
    response_delay: float = 0.0
    #: `/health` accepts the connection and never answers (until `stop()`).
    health_hang: bool = False

    def __post_init__(self) -> None:
        # Checked here so that a typo fails where the stub is configured, not as a silent
        # "never ready" endpoint later.
        if self.cold_style not in COLD_STYLES:
            raise ValueError(f"cold_style must be one of {COLD_STYLES}, got {self.cold_style!r}")
        if self.fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, got {self.fail_mode!r}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be between 0 and 1, got {self.fail_rate!r}")
        for name in ("cold_start", "response_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("redirect_after", "scaledown_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if self.proxy_auth is not None and len(self.proxy_auth) != 2:
            raise ValueError("proxy_auth must be a (key, secret) pair")


@dataclass
class Stats:
    """Counters of what the stub saw and billed; updated under a lock, read with `snapshot()`."""

    #: Requests by path ("/health", "/v1/models", "/v1/chat/completions", "/__result", ...).
    requests: dict[str, int] = field(default_factory=dict)
    health_requests: int = 0
    #: Container boots: the first one and every one after a scale-to-zero.
    cold_starts: int = 0
    #: `time.monotonic()` when the current container became ready; `None` while it is not.
    ready_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chat_requests: int = 0
    #: 401 answers (API key or proxy credentials).
    unauthorized: int = 0
    #: TCP connections accepted (keep-alive clients reuse one).
    connections: int = 0
    #: Requests failed on purpose by `fail_rate`.
    injected_failures: int = 0
    #: 303 answers sent to held requests.
    redirects: int = 0
    _closed_seconds: float = field(default=0.0, init=False, repr=False)
    _up_since: float | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @property
    def container_seconds(self) -> float:
        """Billed seconds: every container lifetime from boot start to scale-down, or to now."""
        with self._lock:
            return self._billed(time.monotonic())

    def billed_seconds(self) -> float:
        """The same as `container_seconds`, as a method."""
        return self.container_seconds

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter, `container_seconds` computed now."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "health_requests": self.health_requests,
                "cold_starts": self.cold_starts,
                "container_seconds": self._billed(time.monotonic()),
                "ready_at": self.ready_at,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "chat_requests": self.chat_requests,
                "unauthorized": self.unauthorized,
                "connections": self.connections,
                "injected_failures": self.injected_failures,
                "redirects": self.redirects,
            }

    def _billed(self, now: float) -> float:
        running = now - self._up_since if self._up_since is not None else 0.0
        return self._closed_seconds + running

    def _add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def _count_request(self, key: str) -> None:
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            if key == "/health":
                self.health_requests += 1

    def _container_up(self, now: float) -> None:
        with self._lock:
            self.cold_starts += 1
            self._up_since = now
            self.ready_at = None

    def _container_ready(self, now: float) -> None:
        with self._lock:
            self.ready_at = now

    def _container_down(self, now: float) -> None:
        with self._lock:
            if self._up_since is not None:
                self._closed_seconds += now - self._up_since
            self._up_since = None
            self.ready_at = None


# --------------------------------------------------------------------------------------------
# Script rules
# --------------------------------------------------------------------------------------------

_RULE_KEYS = ("match", "role", "reply", "tool_call")
_TOOL_CALL_KEYS = ("name", "arguments")
_ROLES = ("user", "tool")
# `{0}`, `{1}`, `{name}` (named group) and `{last}`; any other brace is literal text, so a reply
# may contain JSON.
_FIELD = re.compile(r"\{(\d+|[A-Za-z_]\w*)\}")
_ANYTHING = re.compile(r".*", re.DOTALL)


@dataclass(frozen=True)
class Rule:
    """One script rule: when the last message matches, answer `reply` or call a tool."""

    pattern: re.Pattern[str] | None
    role: str = "user"
    reply: str | None = None
    tool_name: str | None = None
    tool_arguments: dict[str, Any] = field(default_factory=dict)

    def match(self, role: str, content: str) -> re.Match[str] | None:
        """The match object when the rule applies to a last message, else `None`."""
        if role != self.role:
            return None
        if self.pattern is None:
            return _ANYTHING.match(content)
        return self.pattern.search(content)


def load_script(path: str | os.PathLike[str]) -> list[Rule]:
    """Read and validate a TOML rules file; raise `ValueError` with a one-line message.

    The file holds `[[rules]]` tables, tried in order, first match wins::

        [[rules]]
        match = "weather in (\\\\w+)"  # regex searched case-insensitively; omitted: anything
        role = "user"                # role of the last message: "user" (default) or "tool"
        reply = "Sunny in {1}."      # {0}, {1}.. groups, {name} named groups, {last} content
        # or: tool_call = { name = "get_weather", arguments = { city = "{1}" } }

    A `tool_call` rule only fires when the request offers tools (and `tool_choice` is not
    "none"): a model cannot call a tool it was not given.
    """
    # tomllib is 3.11+; on 3.10 the `tomli` backport (a declared dependency there) has the same
    # API. Imported by name so mypy is clean whether or not the backport is installed.
    tomllib: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")

    where = f"stub script {os.fspath(path)!s}"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: invalid TOML: {_one_line(str(exc))}") from None

    unknown = sorted(set(data) - {"rules"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected only [[rules]])")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ValueError(f"{where}: 'rules' must be an array of tables ([[rules]])")
    return [_parse_rule(raw, f"{where}: rule {n}") for n, raw in enumerate(raw_rules, start=1)]


def _parse_rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a table")
    unknown = sorted(set(raw) - set(_RULE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(_RULE_KEYS)})")
    pattern: re.Pattern[str] | None = None
    if "match" in raw:
        if not isinstance(raw["match"], str):
            raise ValueError(f"{where}: 'match' must be a string (a regular expression)")
        try:
            pattern = re.compile(raw["match"], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"{where}: bad regex {raw['match']!r}: {exc}") from None
    role = raw.get("role", "user")
    if role not in _ROLES:
        raise ValueError(f"{where}: 'role' must be one of {', '.join(_ROLES)}, got {role!r}")
    has_reply, has_tool = "reply" in raw, "tool_call" in raw
    if has_reply == has_tool:
        problem = "both 'reply' and 'tool_call'" if has_reply else "neither 'reply' nor 'tool_call'"
        raise ValueError(f"{where}: has {problem}; give exactly one")
    groups = pattern.groups if pattern is not None else 0
    if has_reply:
        if not isinstance(raw["reply"], str):
            raise ValueError(f"{where}: 'reply' must be a string")
        _check_fields(raw["reply"], groups, where)
        return Rule(pattern=pattern, role=role, reply=raw["reply"])
    tool = raw["tool_call"]
    if not isinstance(tool, dict):
        raise ValueError(f"{where}: 'tool_call' must be a table {{ name = ..., arguments = ... }}")
    unknown = sorted(set(tool) - set(_TOOL_CALL_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r} in tool_call (valid: name, arguments)"
        )
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: tool_call needs a 'name' string")
    arguments = tool.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: tool_call 'arguments' must be a table")
    for text in _strings(arguments):
        _check_fields(text, groups, where)
    return Rule(pattern=pattern, role=role, tool_name=name, tool_arguments=arguments)


def _check_fields(template: str, groups: int, where: str) -> None:
    # Only numbered references are checked: `{word}` that is no named group stays literal text.
    for found in _FIELD.finditer(template):
        key = found.group(1)
        if key.isdigit() and int(key) > groups:
            raise ValueError(
                f"{where}: {{{key}}} refers to a regex group that does not exist "
                f"(the pattern has {groups})"
            )


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _format(template: str, match: re.Match[str], last: str) -> str:
    def field_value(found: re.Match[str]) -> str:
        key = found.group(1)
        if key == "last":
            return last
        if key.isdigit():
            return match.group(int(key)) or ""
        if key in match.re.groupindex:
            return match.group(key) or ""
        return found.group(0)

    return _FIELD.sub(field_value, template)


def _format_deep(value: Any, match: re.Match[str], last: str) -> Any:
    if isinstance(value, str):
        return _format(value, match, last)
    if isinstance(value, dict):
        return {key: _format_deep(item, match, last) for key, item in value.items()}
    if isinstance(value, list):
        return [_format_deep(item, match, last) for item in value]
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Deterministic replies
# --------------------------------------------------------------------------------------------


def sample_from_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A deterministic JSON value that satisfies common JSON schemas (first choices, zeros)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 12:
        return "stub"
    if "$ref" in schema:
        return sample_from_schema(_resolve_ref(root, str(schema["$ref"])), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            # Prefer a non-null option so Optional[X] fields get an X.
            chosen = next((o for o in options if _type_of(o, root) != "null"), options[0])
            return sample_from_schema(chosen, root, depth + 1)
    kind = _type_of(schema, root)
    if kind == "object":
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            return {}
        return {name: sample_from_schema(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        if schema.get("maxItems") == 0:
            return []
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            return [sample_from_schema(item, root, depth + 1) for item in prefix]
        return [sample_from_schema(schema.get("items", {"type": "string"}), root, depth + 1)]
    if kind == "integer":
        return int(_clamp(0, schema))
    if kind == "number":
        return float(_clamp(0.0, schema))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = "stub"
    min_length, max_length = schema.get("minLength"), schema.get("maxLength")
    if isinstance(min_length, int) and len(text) < min_length:
        text += "x" * (min_length - len(text))
    if isinstance(max_length, int):
        text = text[:max_length]
    return text


def _type_of(schema: Any, root: Any) -> str:
    if not isinstance(schema, dict):
        return "string"
    if "$ref" in schema:
        return _type_of(_resolve_ref(root, str(schema["$ref"])), root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if not part:
            continue
        if not isinstance(node, dict):
            return {}
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
    return node


def _clamp(value: float, schema: Mapping[str, Any]) -> float:
    low, high = schema.get("minimum"), schema.get("maximum")
    exclusive_low = schema.get("exclusiveMinimum")
    if isinstance(low, (int, float)) and value < low:
        value = low
    if isinstance(exclusive_low, (int, float)) and value <= exclusive_low:
        value = exclusive_low + 1
    if isinstance(high, (int, float)) and value > high:
        value = high
    return value


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: object) -> str:
    """The text of a message's `content`: a string, a list of parts, or nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _pieces(text: str) -> list[str]:
    """The streamed pieces of a text: one word each, with its following whitespace."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


def _truncate_words(text: str, limit: int) -> str:
    found = re.match(rf"\s*(?:\S+\s+){{{max(limit, 0)}}}", text)
    return found.group(0).rstrip() if found else text


@dataclass
class _Reply:
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    arrived: float


class _Gone(Exception):
    """The server stopped or died while a request waited; `stopped` tells which."""

    def __init__(self, stopped: bool) -> None:
        super().__init__("stopped" if stopped else "dead")
        self.stopped = stopped


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

# Container states of the emulator.
_NEW, _BOOTING, _READY, _DOWN, _DEAD, _STOPPED = (
    "new",
    "booting",
    "ready",
    "down",
    "dead",
    "stopped",
)


class StubServer:
    """A deterministic OpenAI-compatible server on a local port, with readiness switches.

    `start()` binds at once (so `port` is valid), then listens and serves from daemon threads;
    `stop()` ends everything. Use it as a context manager in tests.
    """

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
        self.stats = Stats()
        self._requested_port = port
        self._rng = random.Random(self.behaviour.seed)
        # One condition guards the container state; every state change notifies it so held
        # requests and the clock thread re-check at once instead of polling.
        self._cond = threading.Condition()
        self._state = _NEW
        self._listen_at = 0.0
        self._ready_deadline = 0.0
        self._inflight = 0
        self._last_activity = 0.0
        self._counter = 0
        self._pending: dict[str, _Request] = {}
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._stop_event = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._clock_thread: threading.Thread | None = None
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._threads: list[threading.Thread] = []

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
        """The emulated container: new, booting, ready, down (scaled to zero), dead, stopped."""
        with self._cond:
            return self._state

    def start(self) -> StubServer:
        """Bind now, begin the cold start, serve from daemon threads; return `self`."""
        with self._cond:
            if self._state != _NEW:
                raise RuntimeError("StubServer.start() called twice")
            httpd = self._make_httpd()
            try:
                httpd.server_bind()
            except OSError:
                httpd.server_close()
                raise
            self._httpd = httpd
            self.port = int(httpd.socket.getsockname()[1])
            now = time.monotonic()
            self._boot_locked(now)
            cold = self.behaviour.cold_start
            style = self.behaviour.cold_style
            # A bound socket that does not listen yet refuses connections on Linux, exactly
            # like vLLM, which binds its port only once the engine is loaded.
            if style == "refuse":
                self._listen_at = now + cold
            elif style == "refuse-then-503":
                self._listen_at = now + cold / 2
            else:
                self._listen_at = now
            self._tick_locked(now)
            self._clock_thread = threading.Thread(
                target=self._run_clock, name=f"stub-server-clock-{self.port}", daemon=True
            )
            self._clock_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: release held requests, close every socket, join threads. Idempotent."""
        with self._cond:
            if self._state == _STOPPED:
                return
            if self._state in (_BOOTING, _READY):
                self.stats._container_down(time.monotonic())
            self._state = _STOPPED
            self._ready.clear()
            self._stop_event.set()
            self._cond.notify_all()
        self._close_listener()
        # First stop reading only: idle keep-alive connections see EOF and end, while held
        # requests can still write their 503. Then cut whatever is left.
        self._shutdown_connections(socket.SHUT_RD)
        self._join_connections(1.0)
        self._shutdown_connections(socket.SHUT_RDWR)
        self._join_connections(1.0)
        if self._clock_thread is not None and self._clock_thread is not threading.current_thread():
            self._clock_thread.join(1.0)

    def die(self) -> None:
        """The endpoint dies for good: connections are refused from now on."""
        with self._cond:
            if self._state in (_DEAD, _STOPPED, _NEW):
                if self._state == _NEW:
                    self._state = _DEAD
                return
            if self._state in (_BOOTING, _READY):
                self.stats._container_down(time.monotonic())
            self._state = _DEAD
            self._ready.clear()
            self._cond.notify_all()
        self._close_listener()
        self._shutdown_connections(socket.SHUT_RDWR)

    def make_ready(self) -> None:
        """End the current cold start now (for tests that control time)."""
        with self._cond:
            if self._state != _BOOTING:
                return
            now = time.monotonic()
            self._listen_at = min(self._listen_at, now)
            self._ready_deadline = now
            self._tick_locked(now)

    def scale_to_zero(self) -> None:
        """Emulator: stop the container now; the next request starts a new cold start."""
        with self._cond:
            if self._state in (_BOOTING, _READY):
                self._scale_down_locked(time.monotonic())

    def wait_listening(self, timeout: float | None = None) -> bool:
        """Block until the socket listens (the refusing phase is over); `False` on timeout."""
        return self._listening.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the container is ready; `False` on timeout."""
        return self._ready.wait(timeout)

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"StubServer(base_url={self.base_url!r}, model={self.model!r}, state={self._state!r})"
        )

    # -- container lifecycle (call with self._cond held) -----------------------------------

    def _boot_locked(self, now: float) -> None:
        self._state = _BOOTING
        self._ready.clear()
        self._ready_deadline = now + self.behaviour.cold_start
        self.stats._container_up(now)
        self._cond.notify_all()

    def _tick_locked(self, now: float) -> float | None:
        """Apply due transitions; return seconds until the next one (None: none scheduled)."""
        wait: float | None = None
        if self._state == _BOOTING:
            if not self._listening.is_set():
                if now >= self._listen_at:
                    self._activate_locked()
                else:
                    wait = self._listen_at - now
            if now >= self._ready_deadline:
                self._state = _READY
                self._last_activity = now
                self.stats._container_ready(now)
                self._ready.set()
                self._cond.notify_all()
            else:
                remaining = self._ready_deadline - now
                wait = remaining if wait is None else min(wait, remaining)
        window = self.behaviour.scaledown_window
        if self._state == _READY and window is not None and self._inflight == 0:
            idle_end = self._last_activity + window
            if now >= idle_end:
                self._scale_down_locked(now)
            else:
                wait = idle_end - now
        return wait

    def _activate_locked(self) -> None:
        assert self._httpd is not None
        self._httpd.server_activate()
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"stub-server-{self.port}",
            daemon=True,
        )
        self._serve_thread.start()
        self._listening.set()

    def _scale_down_locked(self, now: float) -> None:
        self._state = _DOWN
        self._ready.clear()
        self.stats._container_down(now)
        self._cond.notify_all()

    def _run_clock(self) -> None:
        # One thread drives every timed transition (listen, ready, scale-down), so the time a
        # transition is recorded (`stats.ready_at`) is the time it takes effect.
        with self._cond:
            while self._state not in (_STOPPED, _DEAD):
                wait = self._tick_locked(time.monotonic())
                self._cond.wait(wait)

    # -- sockets and threads ---------------------------------------------------------------

    def _close_listener(self) -> None:
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

    def _track(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._conn_lock:
            self._connections[conn] = thread
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        self.stats._add("connections")
        if self._stop_event.is_set():
            # Accepted in the instant stop() ran: do not let it outlive stop().
            self._shutdown_one(conn, socket.SHUT_RDWR)

    def _untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.pop(conn, None)

    def _shutdown_connections(self, how: int) -> None:
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            self._shutdown_one(conn, how)

    @staticmethod
    def _shutdown_one(conn: socket.socket, how: int) -> None:
        with contextlib.suppress(OSError):  # already closed by its handler
            conn.shutdown(how)

    def _join_connections(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._conn_lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is threading.current_thread():
                continue
            thread.join(max(0.0, deadline - time.monotonic()))

    def _make_httpd(self) -> ThreadingHTTPServer:
        # Imported here, not at module level: `http.server` pulls in `http.client`, `email` and
        # `ssl`, which the plugin must not pay for when no stub is started.
        import socketserver
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn and the Modal proxy
            # Headers and body are separate writes: with Nagle on, a keep-alive client waits
            # for a delayed ACK (40 ms) on every answer.
            disable_nagle_algorithm = True
            server_version = "pytest-modal-vllm-stub"
            sys_version = ""

            def do_GET(self) -> None:
                stub._handle(self, "GET")

            def do_POST(self) -> None:
                stub._handle(self, "POST")

            def do_PUT(self) -> None:
                stub._handle(self, "PUT")

            def do_DELETE(self) -> None:
                stub._handle(self, "DELETE")

            def do_PATCH(self) -> None:
                stub._handle(self, "PATCH")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # silent: a test run must not get one stderr line per request

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            # The stub joins its own threads with a timeout; the mixin would join forever.
            block_on_close = False
            request_queue_size = 128
            # Port 0: keep the reserved port exclusive while it is bound but not listening.
            allow_reuse_address = stub._requested_port != 0

            def server_bind(self) -> None:
                # HTTPServer.server_bind also calls socket.getfqdn(), a DNS lookup that can
                # take seconds; the stub has no use for the name.
                socketserver.TCPServer.server_bind(self)
                self.server_name = stub.host
                self.server_port = int(self.socket.getsockname()[1])

            def process_request(self, request: Any, client_address: Any) -> None:
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name=f"stub-server-conn-{stub.port}",
                    daemon=True,
                )
                stub._track(request, thread)
                thread.start()

            def shutdown_request(self, request: Any) -> None:
                stub._untrack(request)
                super().shutdown_request(request)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client hanging up is normal; stub bugs are answered as 500 instead

        return Server((self.host, self._requested_port), Handler, bind_and_activate=False)

    # -- request handling ------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        try:
            self._handle_request(h, method)
        except OSError:
            h.close_connection = True  # the client went away
        except _Gone as gone:
            h.close_connection = True
            if gone.stopped:
                # If stop() already cut the connection, the closed connection is the answer.
                with contextlib.suppress(OSError):
                    self._send_json(h, 503, {"error": "stopping"}, close=True)
        except Exception as exc:  # a stub bug: answer it so the test that hit it sees it
            try:
                self._send_json(h, 500, _error(f"stub server error: {exc!r}", "InternalError", 500))
            except OSError:
                h.close_connection = True

    def _handle_request(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        body = self._read_body(h)
        if body is None:
            return
        request = _Request(
            method=method,
            path=path,
            headers={key.lower(): value for key, value in h.headers.items()},
            body=body,
            arrived=time.monotonic(),
        )
        self.stats._count_request("/__result" if path.startswith(_RESULT_PREFIX) else path)

        # Modal's proxy checks its credentials before anything reaches a container.
        proxy = self.behaviour.proxy_auth
        if proxy is not None:
            key, secret = request.headers.get("modal-key"), request.headers.get("modal-secret")
            if key is None or secret is None or (key, secret) != tuple(proxy):
                self.stats._add("unauthorized")
                text = PROXY_AUTH_MISSING if key is None or secret is None else PROXY_AUTH_INVALID
                self._send(h, 401, text.encode(), "text/plain; charset=utf-8")
                return

        if path == "/health" and self.behaviour.health_hang:
            self._stop_event.wait()
            raise _Gone(stopped=False)  # a hung endpoint never answers, not even now

        target = request
        result_id: str | None = None
        if path.startswith(_RESULT_PREFIX):
            result_id = path[len(_RESULT_PREFIX) :]
            with self._cond:
                pending = self._pending.get(result_id)
            if pending is None:
                self._send_json(h, 404, {"detail": "Not Found"})
                return
            if method != "GET":
                self._send_json(h, 405, {"detail": "Method Not Allowed"})
                return
            target = pending

        verdict = self._admit(target, request.arrived, result_id)
        if verdict == "503":
            self._send_json(h, 503, {"error": "starting"})
            return
        if verdict.startswith("303 "):
            self.stats._add("redirects")
            location = _RESULT_PREFIX + verdict[4:]
            self._send(h, 303, b"", None, {"Location": location})
            return
        try:
            if result_id is not None:
                with self._cond:
                    self._pending.pop(result_id, None)
            self._respond(h, target)
        finally:
            with self._cond:
                self._inflight -= 1
                self._last_activity = time.monotonic()
                self._cond.notify_all()

    def _admit(self, request: _Request, arrived: float, result_id: str | None) -> str:
        """Wait for the container: "ok" (in flight), "503", "303 <id>", or raise `_Gone`."""
        redirect_after = self.behaviour.redirect_after
        deadline = None if redirect_after is None else arrived + redirect_after
        with self._cond:
            # Any request keeps a Modal container warm, and wakes one that scaled to zero.
            self._last_activity = time.monotonic()
            while True:
                if self._state == _DOWN:
                    self._boot_locked(time.monotonic())
                    self._tick_locked(time.monotonic())
                    continue
                if self._state == _READY:
                    self._inflight += 1
                    return "ok"
                if self._state != _BOOTING:
                    # Stopped: answer 503 and close; dead: the connection just drops.
                    raise _Gone(stopped=self._state == _STOPPED)
                # Once listening, every style but "hold" answers 503 during a boot ("refuse" only
                # applies to the first one; read live, so a test may switch styles between boots).
                if self.behaviour.cold_style != "hold":
                    return "503"
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    if result_id is None:
                        self._counter += 1
                        result_id = f"fc-{self._counter:06d}"
                        self._pending[result_id] = request
                    return f"303 {result_id}"
                self._cond.wait(None if deadline is None else deadline - now)

    def _respond(self, h: BaseHTTPRequestHandler, request: _Request) -> None:
        path, method = request.path, request.method
        if path == "/v1" or path.startswith("/v1/"):
            if self.behaviour.fail_rate > 0 and self._draw_failure():
                self.stats._add("injected_failures")
                if self.behaviour.fail_mode == "reset":
                    self._reset(h)
                    return
                self._send_json(h, 503, {"error": "injected failure"})
                return
            key = self.behaviour.api_key
            if key is not None and request.headers.get("authorization") != f"Bearer {key}":
                self.stats._add("unauthorized")
                self._send_json(h, 401, {"error": "Unauthorized"})
                return
        if path == "/health":
            if method != "GET":
                self._send_json(h, 405, {"detail": "Method Not Allowed"})
                return
            self._send(h, 200, b"", None)
        elif path == "/v1/models":
            if method != "GET":
                self._send_json(h, 405, {"detail": "Method Not Allowed"})
                return
            model = {"id": self.model, "object": "model", "created": CREATED, "owned_by": "stub"}
            self._send_json(h, 200, {"object": "list", "data": [model]})
        elif path == "/v1/chat/completions":
            if method != "POST":
                self._send_json(h, 405, {"detail": "Method Not Allowed"})
                return
            self._chat(h, request)
        else:
            self._send_json(h, 404, {"detail": "Not Found"})

    def _draw_failure(self) -> bool:
        with self._cond:
            return self._rng.random() < self.behaviour.fail_rate

    def _next_id(self) -> int:
        with self._cond:
            self._counter += 1
            return self._counter

    # -- chat completions ------------------------------------------------------------------

    def _chat(self, h: BaseHTTPRequestHandler, request: _Request) -> None:
        try:
            payload = json.loads(request.body or b"null")
        except ValueError:
            self._send_json(h, 400, _error("request body is not valid JSON", "BadRequestError"))
            return
        if not isinstance(payload, dict):
            self._send_json(h, 400, _error("request body must be a JSON object", "BadRequestError"))
            return
        model = payload.get("model", self.model)
        if model != self.model:
            problem = f"The model `{model}` does not exist."
            self._send_json(h, 404, _error(problem, "NotFoundError", 404, param="model"))
            return
        messages = payload.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            problem = "'messages' must be a non-empty list of message objects"
            self._send_json(h, 400, _error(problem, "BadRequestError", param="messages"))
            return
        self.stats._add("chat_requests")
        delay = self.behaviour.response_delay
        if delay > 0 and self._stop_event.wait(delay):
            raise _Gone(stopped=True)

        reply = self._compose(payload, messages)
        prompt_tokens = sum(_words(_text_of(m.get("content"))) + 1 for m in messages)
        if reply.tool_calls is not None:
            completion_tokens = sum(_words(c["function"]["arguments"]) for c in reply.tool_calls)
        else:
            completion_tokens = _words(reply.content or "")
        with self.stats._lock:
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = f"chatcmpl-stub-{self._next_id()}"
        if payload.get("stream"):
            options = payload.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            self._stream(h, completion_id, str(model), reply, usage if include_usage else None)
            return
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls is not None:
            message["tool_calls"] = reply.tool_calls
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": usage,
        }
        self._send_json(h, 200, body)

    def _compose(self, payload: dict[str, Any], messages: list[dict[str, Any]]) -> _Reply:
        """Pick the reply: a script rule, then a forced tool, a response format, the echo."""
        last = messages[-1]
        role = str(last.get("role", "user"))
        content = _text_of(last.get("content"))
        tools = payload.get("tools")
        tool_choice = payload.get("tool_choice")
        # A model cannot call a tool it was not offered (or was told not to call).
        tools_allowed = bool(tools) and tool_choice != "none"
        for rule in self.rules:
            if rule.tool_name is not None and not tools_allowed:
                continue
            found = rule.match(role, content)
            if found is None:
                continue
            if rule.tool_name is not None:
                arguments = _format_deep(rule.tool_arguments, found, content)
                return self._tool_reply(rule.tool_name, arguments)
            return self._limit(_format(rule.reply or "", found, content), payload)

        forced = _forced_tool(tools, tool_choice) if tools_allowed else None
        if forced is not None:
            name, parameters = forced
            arguments = sample_from_schema(parameters)
            return self._tool_reply(name, arguments if isinstance(arguments, dict) else {})

        response_format = payload.get("response_format")
        if isinstance(response_format, dict):
            kind = response_format.get("type")
            if kind == "json_schema":
                spec = response_format.get("json_schema")
                schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
                return _Reply(json.dumps(sample_from_schema(schema)), None, "stop")
            if kind == "json_object":
                return _Reply("{}", None, "stop")
        return self._limit(f"echo: {content}", payload)

    def _tool_reply(self, name: str, arguments: dict[str, Any]) -> _Reply:
        call = {
            "id": f"call_{self._next_id()}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        return _Reply(None, [call], "tool_calls")

    @staticmethod
    def _limit(text: str, payload: Mapping[str, Any]) -> _Reply:
        # Like a real server, stop at max_tokens (one token per word here).
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and _words(text) > limit:
            return _Reply(_truncate_words(text, limit), None, "length")
        return _Reply(text, None, "stop")

    def _stream(
        self,
        h: BaseHTTPRequestHandler,
        completion_id: str,
        model: str,
        reply: _Reply,
        usage: dict[str, int] | None,
    ) -> None:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if usage is not None:
                data["usage"] = None  # OpenAI: every chunk but the last carries usage: null
            return data

        events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": ""})]
        if reply.tool_calls is not None:
            for index, call in enumerate(reply.tool_calls):
                head = {
                    "index": index,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
                events.append(chunk({"tool_calls": [head]}))
                for piece in _pieces(call["function"]["arguments"]):
                    part = {"index": index, "function": {"arguments": piece}}
                    events.append(chunk({"tool_calls": [part]}))
        else:
            events.extend(chunk({"content": piece}) for piece in _pieces(reply.content or ""))
        events.append(chunk({}, reply.finish_reason))
        if usage is not None:
            last = chunk({})
            last["choices"] = []
            last["usage"] = usage
            events.append(last)

        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        # Chunked transfer encoding keeps the connection reusable after the stream ends.
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for event in events:
            _write_chunk(h, b"data: " + json.dumps(event).encode() + b"\n\n")
        _write_chunk(h, b"data: [DONE]\n\n")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    # -- low-level I/O ---------------------------------------------------------------------

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes | None:
        """The request body (Content-Length or chunked); `None` after answering a bad one."""
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                line = h.rfile.readline(1024)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._bad_request(h, "bad chunked encoding")
                    return None
                if size == 0:
                    while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > _MAX_BODY:
                    self._bad_request(h, "request body too large")
                    return None
                parts.append(h.rfile.read(size))
                h.rfile.readline(1024)
        raw_length = h.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self._bad_request(h, "bad Content-Length")
            return None
        return h.rfile.read(length) if length else b""

    def _bad_request(self, h: BaseHTTPRequestHandler, message: str) -> None:
        h.close_connection = True  # the stream position is unknown now
        self._send_json(h, 400, _error(message, "BadRequestError"), close=True)

    def _send_json(
        self, h: BaseHTTPRequestHandler, status: int, body: object, *, close: bool = False
    ) -> None:
        self._send(h, status, json.dumps(body).encode(), "application/json", close=close)

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
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

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN: the client sees
        # "connection reset by peer", as when a proxy or container drops a request.
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()


def _write_chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


def _error(message: str, kind: str, code: int = 400, *, param: str | None = None) -> dict[str, Any]:
    """An error body shaped like vLLM's (and OpenAI's): `{"error": {message, type, code}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _forced_tool(tools: object, tool_choice: object) -> tuple[str, Any] | None:
    """The (name, parameters schema) that `tool_choice` forces, if it forces one."""
    if not isinstance(tools, list):
        return None
    functions = [
        t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    wanted: str | None = None
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            wanted = function["name"]
    elif tool_choice != "required":
        return None
    for function in functions:
        if wanted is None or function.get("name") == wanted:
            return str(function.get("name", "")), function.get("parameters", {})
    return None


# --------------------------------------------------------------------------------------------
# Command line: a cheap child process for tests of the `process` platform kind
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run a stub server in the foreground until SIGTERM or SIGINT; return the exit code."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(
        prog="python -m pytest_modal_vllm.stub_server",
        description="Deterministic OpenAI-compatible stub server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="stub")
    parser.add_argument("--script", default=None, help="TOML rules file")
    parser.add_argument("--cold-start", type=float, default=0.0)
    parser.add_argument("--cold-style", choices=COLD_STYLES, default="refuse-then-503")
    parser.add_argument("--redirect-after", type=float, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--proxy-auth", nargs=2, metavar=("KEY", "SECRET"), default=None)
    parser.add_argument("--scaledown-window", type=float, default=None)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-mode", choices=FAIL_MODES, default="503")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--response-delay", type=float, default=0.0)
    parser.add_argument("--health-hang", action="store_true")
    args = parser.parse_args(argv)

    try:
        behaviour = Behaviour(
            cold_start=args.cold_start,
            cold_style=args.cold_style,
            redirect_after=args.redirect_after,
            api_key=args.api_key,
            proxy_auth=tuple(args.proxy_auth) if args.proxy_auth else None,
            scaledown_window=args.scaledown_window,
            fail_rate=args.fail_rate,
            fail_mode=args.fail_mode,
            seed=args.seed,
            response_delay=args.response_delay,
            health_hang=args.health_hang,
        )
        server = StubServer(
            host=args.host,
            port=args.port,
            model=args.model,
            script=args.script,
            behaviour=behaviour,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        # Short waits so the signal handler (main thread only) runs promptly.
        while not stopping.is_set() and not server.wait_listening(0.1):
            pass
        if not stopping.is_set():
            print(f"stub server ready at {server.base_url}", flush=True)
        while not stopping.wait(0.2):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
