"""Ready clients for an `Endpoint`: openai `OpenAI`/`AsyncOpenAI` and LangChain `ChatOpenAI`.

Every client shares one idea: its HTTP client gets a transport wrapper (`PlatformTransport`)
that
- meters each request (latency until the body is consumed, errors, and the `usage` of the
  answer, streamed or not) into the session's `UsageMeter`;
- waits for the endpoint when it went cold mid-session (connection refused, 502/503/504):
  it runs the wake again, bounded by the wake timeout, then retries the request; one re-wake
  is shared by all requests of that platform (`Guard`);
- fails at once, with the cause, once the platform stayed dead through a re-wake.
Proxy-auth headers live on the HTTP client, not in the openai/langchain objects, so that no
`repr` of those shows them.

openai>=3 is built on `httpx2` (openai<3 on `httpx`): the transport wraps whichever the
installed openai uses (`http_module()`).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .endpoint import Endpoint
from .errors import PlatformError
from .probe import check_health
from .resolution import ClientOptions
from .usage import UsageMeter

if TYPE_CHECKING:
    import openai
    from langchain_openai import ChatOpenAI

REWAKE_STATUSES = frozenset({502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REWAKES_PER_REQUEST = 3
# Bodies larger than this are not parsed for usage (only their tail is kept, for SSE).
BODY_CAP = 4 * 1024 * 1024
TAIL_KEEP = 64 * 1024
# openai and langchain insist on a key; when the platform's key variable is unset, they get
# this placeholder and the transport removes the Authorization header, so no key is sent.
NO_KEY = "no-key-set"
_NO_KEY_HEADER = f"Bearer {NO_KEY}"


def http_module() -> ModuleType:
    """`httpx2` for openai>=3, `httpx` for older openai: the library its clients are built on."""
    import openai

    major = int(str(openai.__version__).split(".", 1)[0] or 0)
    if major >= 3:
        import httpx2

        return httpx2
    import httpx

    return httpx


def prewarm_imports() -> None:
    """Import openai and langchain_openai in a background thread (about 3 s of imports here),
    so that a test run pays for them while the wake waits, not after the endpoint is ready."""

    def load() -> None:
        try:
            import langchain_openai  # noqa: F401
            import openai  # noqa: F401
        except Exception:  # a broken install shows up, clearly, where a client is built
            pass

    threading.Thread(target=load, name="vllm-prewarm-imports", daemon=True).start()


class PlatformDown(Exception):
    """Raised inside the transport when the platform stayed dead through a re-wake."""


class Guard:
    """The mid-session health of one platform, shared by all its clients in this process.

    `rewake` is the session's re-wake of the platform (the same wake request as before
    collection, dead-process check included); it raises `PlatformError` when the platform
    stays down.
    """

    def __init__(self, rewake: Callable[[], object]) -> None:
        self._rewake = rewake
        self.dead: str | None = None
        self._lock = threading.Lock()
        self._last_wake = 0.0
        self.rewakes = 0

    def check(self) -> None:
        """Raise `PlatformDown` at once if the platform is known to be dead."""
        if self.dead is not None:
            raise PlatformDown(self.dead)

    def rewake(self) -> bool:
        """Wait until the endpoint is ready again (bounded by its wake timeout).

        Returns True when it is (or another request just saw it come back), False when it
        stayed dead: then `dead` says why and later requests fail at once.
        """
        asked = time.monotonic()
        with self._lock:
            if self.dead is not None:
                return False
            if self._last_wake >= asked:  # another request re-woke it while we waited
                return True
            try:
                self._rewake()
            except PlatformError as error:
                self.dead = str(error)
                return False
            self.rewakes += 1
            self._last_wake = time.monotonic()
            return True


_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def _usage_of(body: bytes) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a JSON answer or an SSE stream; (0, 0) if none.

    OpenAI-compatible servers put `usage` last (the final chunk of a stream), so the counts
    are read after the last `"usage"` key with two small regexes: much cheaper than parsing
    the whole body, which matters for the client-overhead budget.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return 0, 0
    segment = body[at : at + 2048]
    prompt, completion = _PROMPT.search(segment), _COMPLETION.search(segment)
    return (int(prompt.group(1)) if prompt else 0, int(completion.group(1)) if completion else 0)


class _Recorder:
    """Collects a response body as it streams by and records the request when it ends."""

    def __init__(
        self, meter: UsageMeter, platform: str, started: float, error: bool, replayed: bool
    ) -> None:
        self.meter, self.platform, self.started, self.error = meter, platform, started, error
        self.replayed = replayed
        self.parts: list[bytes] = []
        self.size = 0
        self.done = False

    def add(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.size += len(chunk)
        if self.size > BODY_CAP:  # keep only the tail, where a stream's usage chunk is
            tail = b"".join(self.parts)[-TAIL_KEEP:]
            self.parts, self.size = [tail], len(tail)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        prompt, completion = _usage_of(b"".join(self.parts)) if not self.error else (0, 0)
        self.meter.record(
            self.platform,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            error=self.error,
            prompt_tokens=prompt,
            completion_tokens=completion,
            replayed=self.replayed,
        )


@functools.cache
def _stream_types(lib: ModuleType) -> tuple[type, type]:
    """Metering wrappers of response bodies, subclassing the HTTP library's stream types
    (its clients check `isinstance`)."""

    class MeteredStream(lib.SyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, inner: Any, recorder: _Recorder) -> None:
            self.inner, self.recorder = inner, recorder

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner:
                self.recorder.add(chunk)
                yield chunk

        def close(self) -> None:
            try:
                self.inner.close()
            finally:
                self.recorder.finish()

    class AsyncMeteredStream(lib.AsyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, inner: Any, recorder: _Recorder) -> None:
            self.inner, self.recorder = inner, recorder

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self.inner:
                self.recorder.add(chunk)
                yield chunk

        async def aclose(self) -> None:
            try:
                await self.inner.aclose()
            finally:
                self.recorder.finish()

    return MeteredStream, AsyncMeteredStream


# The steps an exchange yields: ("send", request) -> the response; ("block", call) -> what the
# blocking call (a re-wake, a /health probe) returns; ("discard", response) closes a response.
_Exchange = Generator[tuple[str, Any], Any, Any]


class _Steps:
    """Drives an `_exchange` generator: hands each step's result (or error) back to it."""

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange
        self.result: Any = None

    def next(self, reply: Any = None) -> Any:
        """The next step, given the last one's result; None when the exchange is over."""
        try:
            return self._exchange.send(reply)
        except StopIteration as done:
            self.result = done.value
            return None

    def fail(self, error: Exception) -> Any:
        """The next step, after the last one raised `error`; None when the exchange is over."""
        try:
            return self._exchange.throw(error)
        except StopIteration as done:
            self.result = done.value
            return None


def _no_recording(error: Exception) -> None:
    """Fail the test with vcrpy's explanation of the closest mismatch: as an outcome, which
    openai does not catch, retry and turn into a bare "Connection error"."""
    import pytest

    message = f"no recording answers this request (replaying cassettes): {error}"
    raise pytest.fail.Exception(message, pytrace=False) from None


class PlatformTransport:
    """Wraps the HTTP library's transport: metering, re-wake on a cold endpoint, fail fast.

    The logic lives once, in `_exchange()`, a generator that yields the I/O it needs; the sync
    `handle_request` and the async `handle_async_request` (of `AsyncPlatformTransport`) are the
    two thin shells httpx requires, each running those steps its own way.
    """

    def __init__(
        self, inner: Any, endpoint: Endpoint, meter: UsageMeter, guard: Guard, lib: ModuleType
    ) -> None:
        self.inner, self.endpoint, self.meter, self.guard, self.lib = (
            inner,
            endpoint,
            meter,
            guard,
            lib,
        )
        # Redirect targets the client is about to follow -> when the redirected request began.
        self._hops: dict[str, float] = {}
        # The metering wrappers of response bodies (sync, async) for this HTTP library.
        self._sync_stream, self._async_stream = _stream_types(lib)

    def _exchange(self, request: Any, stream_type: type) -> _Exchange:
        """Send `request`, waiting through a mid-session cold start; meter the answer."""
        # A followed redirect continues the request that got it: meter from that one's start.
        hop = self._hops.pop(str(request.url), None) if self._hops else None
        started = hop or time.perf_counter()
        if request.headers.get("authorization") == _NO_KEY_HEADER:
            del request.headers["authorization"]
        for attempt in range(MAX_REWAKES_PER_REQUEST + 1):
            may_rewake = attempt < MAX_REWAKES_PER_REQUEST
            try:
                self.guard.check()
                response = yield ("send", request)
            except self.lib.ConnectError as error:
                if may_rewake and (yield ("block", self.guard.rewake)):
                    continue
                raise self._fail(started, error) from error
            except Exception as error:  # PlatformDown included
                if type(error).__name__ == "CannotOverwriteExistingCassetteException":
                    self._fail(started, error)
                    _no_recording(error)
                raise self._fail(started, error) from error
            if (
                response.status_code in REWAKE_STATUSES
                and may_rewake
                and (yield ("block", self._went_cold))
            ):
                yield ("discard", response)
                if (yield ("block", self.guard.rewake)):
                    continue
                down = PlatformDown(self.guard.dead or "it did not come back")
                raise self._fail(started, down) from None
            return self._wrap(request, response, started, stream_type)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fail(self, started: float, error: BaseException) -> BaseException:
        self.meter.record(
            self.endpoint.platform, latency_ms=(time.perf_counter() - started) * 1000, error=True
        )
        if isinstance(error, PlatformDown):
            connect_error: type[BaseException] = self.lib.ConnectError
            return connect_error(f"LLM platform {self.endpoint.platform!r} is down: {error}")
        return error

    def _wrap(self, request: Any, response: Any, started: float, stream_type: type) -> Any:
        if response.status_code in REDIRECT_STATUSES and (
            location := response.headers.get("location")
        ):
            # One hop of a redirect chain (Modal's 303 after a long hold): not a request of its
            # own; the request it leads to is metered once, from this hop's start.
            if len(self._hops) > 256:  # redirects the client did not follow
                self._hops.clear()
            self._hops[str(request.url.join(location))] = started
            return response
        # vcrpy answers from a cassette with a response built from the recording: it carries
        # no HTTP version, which every response read off the network has.
        replayed = "http_version" not in response.extensions
        recorder = _Recorder(
            self.meter, self.endpoint.platform, started, response.status_code >= 400, replayed
        )
        response.stream = stream_type(response.stream, recorder)
        return response

    def _went_cold(self) -> bool:
        """After a 502/503/504: is the endpoint's /health not OK either (it went cold)?"""
        return check_health(self.endpoint.root_url, self.endpoint.headers).status != 200

    def handle_request(self, request: Any) -> Any:
        """Send `request` (the sync shell of `_exchange`)."""
        steps = _Steps(self._exchange(request, self._sync_stream))
        step = steps.next()
        while step is not None:
            kind, subject = step
            try:
                if kind == "send":
                    reply = self.inner.handle_request(subject)
                elif kind == "block":
                    reply = subject()
                else:
                    reply = subject.close()
            except Exception as error:
                step = steps.fail(error)
            else:
                step = steps.next(reply)
        return steps.result

    def close(self) -> None:
        """Close the wrapped transport."""
        self.inner.close()


class AsyncPlatformTransport(PlatformTransport):
    """The asyncio shell of `PlatformTransport` (blocking steps run in a worker thread)."""

    async def handle_async_request(self, request: Any) -> Any:
        """Send `request` (the async shell of `_exchange`)."""
        import asyncio

        steps = _Steps(self._exchange(request, self._async_stream))
        step = steps.next()
        while step is not None:
            kind, subject = step
            try:
                if kind == "send":
                    reply = await self.inner.handle_async_request(subject)
                elif kind == "block":
                    reply = await asyncio.to_thread(subject)
                else:
                    reply = await subject.aclose()
            except Exception as error:
                step = steps.fail(error)
            else:
                step = steps.next(reply)
        return steps.result

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.inner.aclose()


class ClientFactory:
    """Builds the clients of one endpoint; holds the endpoint's meter and guard."""

    def __init__(
        self,
        endpoint: Endpoint,
        options: ClientOptions,
        meter: UsageMeter,
        rewake: Callable[[], object],
    ) -> None:
        """`rewake` is the session's re-wake of the platform (raises `PlatformError`)."""
        self.endpoint = endpoint
        self.options = options
        self.meter = meter
        self.guard = Guard(rewake)
        self._closers: list[Callable[[], None]] = []

    def _http_client(self, asynchronous: bool) -> Any:
        """An HTTP client (of openai's HTTP library) with metering and proxy headers."""
        import openai

        lib = http_module()
        if asynchronous:
            transport: Any = AsyncPlatformTransport(
                lib.AsyncHTTPTransport(), self.endpoint, self.meter, self.guard, lib
            )
            client_type: Any = openai.DefaultAsyncHttpxClient
        else:
            transport = PlatformTransport(
                lib.HTTPTransport(), self.endpoint, self.meter, self.guard, lib
            )
            client_type = openai.DefaultHttpxClient
        client = client_type(
            transport=transport, headers=dict(self.endpoint.headers), timeout=self.options.timeout
        )
        if not asynchronous:  # an async client belongs to its event loop, which closes it
            self._closers.append(client.close)
        return client

    def _openai_kwargs(self) -> dict[str, Any]:
        return {
            "base_url": self.endpoint.base_url,
            "api_key": self.endpoint.api_key or NO_KEY,
            "timeout": self.options.timeout,
            "max_retries": self.options.max_retries,
        }

    def openai_client(self) -> openai.OpenAI:
        """An `openai.OpenAI` bound to the endpoint."""
        import openai

        return openai.OpenAI(http_client=self._http_client(False), **self._openai_kwargs())

    def async_openai_client(self) -> openai.AsyncOpenAI:
        """An `openai.AsyncOpenAI` bound to the endpoint (fresh, for the caller's event loop)."""
        import openai

        return openai.AsyncOpenAI(http_client=self._http_client(True), **self._openai_kwargs())

    def chat_model(self, **overrides: Any) -> ChatOpenAI:
        """A `ChatOpenAI` with the platform's client defaults; `overrides` win."""
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(**self.chat_model_kwargs(**overrides))

    def chat_model_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The arguments of `chat_model` (fresh HTTP clients each call); `overrides` win."""
        options = self.options
        kwargs: dict[str, Any] = {
            "model": self.endpoint.model,
            **self._openai_kwargs(),
            "temperature": options.temperature,
            "stream_usage": True,
            "http_client": self._http_client(False),
            "http_async_client": self._http_client(True),
        }
        if options.max_tokens is not None:
            kwargs["max_tokens"] = options.max_tokens
        if options.extra_body:
            kwargs["extra_body"] = dict(options.extra_body)
        kwargs.update(overrides)
        return kwargs

    def close(self) -> None:
        """Close the sync HTTP clients made so far."""
        for close in self._closers:
            try:
                close()
            except Exception:  # closing at teardown must not mask a test result
                pass
        self._closers.clear()
