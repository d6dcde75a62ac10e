"""The readiness state machine: probe an endpoint until it serves, or say exactly why not.

Waking one endpoint:
1. `GET <root>/health` until 200 (a server without `/health`, answering 404/405, goes on to 2);
2. `GET <base>/v1/models` with the key until 200, and the model is served (or one is picked).

Every answer is classified by `classify()`, a pure function:
- not ready yet: connection refused or reset, 502/503/504, other 5xx, a connect timeout, a
  `303` (Modal answers a request held for 150 s with a redirect to a result URL, fetched next);
  these are polled again after a short, growing pause (50 ms up to 250 ms), so readiness is
  seen within a fraction of a second;
- a held request (a Modal web function queues it while a container boots) is simply waited
  for: each probe may take until the deadline, so the answer is seen the moment it comes;
- configuration errors stop at once: 401/403, 404 on `/v1/models`, a model not served, a TLS
  certificate that does not verify;
- an unresolvable host name stops at once as unreachable.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

from .errors import ConfigError, PlatformError, UnavailableError
from .probe import get, health_url, root_of

if TYPE_CHECKING:
    import httpx

    from .resolution import ResolvedPlatform

# A first probe open longer than this was held by the endpoint: the wake counts as cold.
HELD_AFTER = 1.0
FIRST_PAUSE = 0.05
MAX_PAUSE = 0.25
PROXY_AUTH_MARKER = "missing credentials for proxy authorization"
PROXY_AUTH_INVALID_MARKER = "invalid credentials for proxy authorization"


class Verdict(Enum):
    """What one probe answer means."""

    READY = "ready"
    NOT_READY = "not ready"
    REDIRECT = "redirect"
    NO_HEALTH = "no health endpoint"
    CONFIG = "configuration error"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Outcome:
    """A classified probe answer: the verdict, a short label for progress, and details."""

    verdict: Verdict
    label: str
    location: str | None = None
    problem: str = ""
    fix: str = ""


@dataclass(frozen=True)
class WakeRequest:
    """What to wake: the URLs and credentials of one started platform.

    The session builds one per platform (`of()`) and uses it for the wake before collection
    and for every re-wake during the run, so both check the same things.
    """

    platform: str
    base_url: str
    timeout: float
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = "VLLM_API_KEY"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Returns why the endpoint can never come up (a dead server process), or None.
    failure: Callable[[], str | None] = field(default=lambda: None, compare=False)
    # The first progress line (e.g. "no container running: a cold start is expected").
    note: str | None = None
    # The command that shows the server's logs, named when the wake gives up.
    logs: str | None = None

    @classmethod
    def of(
        cls,
        platform: ResolvedPlatform,
        base_url: str,
        failure: Callable[[], str | None] | None = None,
        note: str | None = None,
    ) -> WakeRequest:
        """The wake of a started platform at `base_url`."""
        target = platform.modal
        logs = None
        if target is not None:
            env = f" --env {target.environment}" if target.environment else ""
            logs = f"modal app logs {target.app}{env}"
        return cls(
            platform=platform.name,
            base_url=base_url,
            timeout=platform.wake_timeout.value,
            model=platform.model,
            api_key=platform.api_key,
            api_key_env=platform.api_key_env,
            headers=platform.headers,
            failure=failure or (lambda: None),
            note=note,
            logs=logs,
        )

    @property
    def root_url(self) -> str:
        """The base URL without `/v1`."""
        return root_of(self.base_url)

    def rewake(self) -> WakeResult:
        """Wake again (mid-session, after the endpoint went cold); raises `PlatformError`."""
        return Waker(self).run()


@dataclass(frozen=True)
class WakeResult:
    """A woken endpoint: the model it serves, how long the wake took, whether it was cold."""

    model: str
    seconds: float
    cold: bool
    probes: int


@dataclass
class WakeState:
    """Live state of one wake, read by the progress display from another thread."""

    platform: str
    timeout: float
    started: float = field(default_factory=time.monotonic)
    phase: str = "health"
    last: str = "starting"
    in_flight_since: float | None = None
    done: bool = False
    failed: bool = False

    def line(self, now: float | None = None) -> str:
        """One progress line: `NAME 12.3s/900s 503 Service Unavailable`."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        last = self.last
        if self.in_flight_since is not None and now - self.in_flight_since > HELD_AFTER:
            last = f"request held open {now - self.in_flight_since:.0f}s"
        status = "ready" if self.done and not self.failed else last
        return f"{self.platform} {elapsed:.1f}s/{self.timeout:.0f}s {status}"


def classify(
    phase: str,
    status: int | None,
    body: str = "",
    error: BaseException | None = None,
    location: str | None = None,
) -> Outcome:
    """Classify one probe: `phase` is "health" or "models"; `status` None means no answer."""
    if error is not None:
        return _classify_error(error)
    assert status is not None
    if status == 200:
        return Outcome(Verdict.READY, "200 OK")
    if status in (301, 302, 303, 307, 308) and location:
        return Outcome(Verdict.REDIRECT, f"{status} redirect (request held too long)", location)
    if status in (401, 403):
        if PROXY_AUTH_INVALID_MARKER in body:
            return Outcome(
                Verdict.CONFIG,
                f"{status} proxy auth",
                problem=f"the endpoint answered {status}: the Modal proxy auth token was rejected",
                fix="set MODAL_PROXY_TOKEN_ID and MODAL_PROXY_TOKEN_SECRET to a proxy auth token "
                "of the workspace that serves the endpoint",
            )
        if PROXY_AUTH_MARKER in body:
            return Outcome(
                Verdict.CONFIG,
                f"{status} proxy auth",
                problem=f"the endpoint answered {status}: Modal proxy auth is required",
                fix="use a modal platform with proxy_auth = true and export "
                "MODAL_PROXY_TOKEN_ID and MODAL_PROXY_TOKEN_SECRET",
            )
        return Outcome(Verdict.CONFIG, f"{status}", problem=f"{phase} answered {status}")
    if status == 404 and phase == "models":
        return Outcome(
            Verdict.CONFIG,
            "404 on /v1/models",
            problem="GET /v1/models answered 404: the base URL does not point at an "
            "OpenAI-compatible API",
            fix="check the platform's base URL (it must end in /v1)",
        )
    if phase == "health" and status in (404, 405, 501):
        return Outcome(Verdict.NO_HEALTH, f"{status} on /health")
    if status >= 500 or status in (408, 425, 429):
        return Outcome(Verdict.NOT_READY, f"{status} {_reason(status)}".strip())
    return Outcome(
        Verdict.CONFIG,
        f"{status}",
        problem=f"GET {'/health' if phase == 'health' else '/v1/models'} answered {status}: "
        f"{body[:200]!r}",
        fix="check that the URL points at an OpenAI-compatible server",
    )


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _classify_error(error: BaseException) -> Outcome:
    import ssl

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(item) for item in chain)
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return Outcome(
                Verdict.CONFIG,
                "TLS certificate error",
                problem=f"the TLS certificate of the endpoint does not verify ({_short(text)})",
                fix="use the endpoint's real https URL, or fix the certificate "
                "(SSL_CERT_FILE for a private CA)",
            )
        if isinstance(item, ssl.SSLError):
            return Outcome(
                Verdict.CONFIG,
                "TLS error",
                problem=f"TLS handshake failed ({_short(text)})",
                fix="check the URL scheme: http:// for a plain server, https:// for TLS",
            )
    for item in chain:
        code = getattr(item, "errno", None)
        if (isinstance(item, OSError) and code in (-2, -5)) or "Name or service not known" in text:
            return Outcome(
                Verdict.UNREACHABLE,
                "DNS lookup failed",
                problem=f"the host name does not resolve ({_short(text)})",
                fix="check the host in the URL",
            )
    name = type(error).__name__
    if "Timeout" in name:
        return Outcome(Verdict.NOT_READY, "connect timed out" if "Connect" in name else "timed out")
    refused = (
        any(
            isinstance(item, ConnectionRefusedError)
            or getattr(item, "errno", None) == errno.ECONNREFUSED
            for item in chain
        )
        or "Connection refused" in text
    )
    if refused:
        return Outcome(Verdict.NOT_READY, "connection refused")
    return Outcome(Verdict.NOT_READY, f"{name}: {_short(text)}")


def _short(text: str) -> str:
    return text if len(text) < 160 else text[:157] + "..."


class Waker:
    """Wakes one endpoint; `run()` blocks until ready or raises a `PlatformError`."""

    def __init__(self, request: WakeRequest, *, cancel: threading.Event | None = None) -> None:
        self.request = request
        self.state = WakeState(request.platform, request.timeout, last=request.note or "starting")
        self.cancel = cancel or threading.Event()
        self.probes = 0
        self._cold = False

    def run(self) -> WakeResult:
        """Probe `/health` then `/v1/models` until ready; raise on error or at the deadline."""
        import httpx

        request = self.request
        deadline = self.state.started + request.timeout
        headers = dict(request.headers)
        if request.api_key:
            headers["Authorization"] = f"Bearer {request.api_key}"
        with httpx.Client(headers=headers, follow_redirects=False) as client:
            try:
                self._wait_for(client, "health", health_url(request.root_url), deadline)
                model = self._wait_for(client, "models", f"{request.base_url}/models", deadline)
            except PlatformError as error:
                self.state.failed = True
                self.state.last = error.problem
                raise error.for_platform(request.platform) from None
            finally:
                self.state.in_flight_since = None
        self.state.done = True
        seconds = time.monotonic() - self.state.started
        return WakeResult(model or "", seconds, self._cold, self.probes)

    def _wait_for(self, client: httpx.Client, phase: str, url: str, deadline: float) -> str | None:
        self.state.phase = phase
        pause = FIRST_PAUSE
        target = url
        while True:
            self._check_alive(deadline)
            sent = time.monotonic()
            self.state.in_flight_since = sent
            self.probes += 1
            try:
                # Read timeout = the time left: a held request is answered the moment the
                # endpoint is ready, and never waited on past the deadline.
                answer = get(client, target, deadline - sent)
            finally:
                self.state.in_flight_since = None
            status, body = answer.status, answer.body
            held = time.monotonic() - sent > HELD_AFTER
            outcome = classify(phase, status, body, answer.error, answer.location)
            # Cold: the wake had to wait (not ready, redirected after a hold, or held open).
            if held or outcome.verdict in (Verdict.NOT_READY, Verdict.REDIRECT):
                self._cold = True
            self.state.last = outcome.label
            if outcome.verdict is Verdict.READY:
                return self._model_from(body) if phase == "models" else None
            if outcome.verdict is Verdict.NO_HEALTH:
                return None
            if outcome.verdict is Verdict.CONFIG:
                raise self._config_error(phase, status, outcome)
            if outcome.verdict is Verdict.UNREACHABLE:
                raise UnavailableError(f"{outcome.problem} at {self.request.root_url}", outcome.fix)
            if outcome.verdict is Verdict.REDIRECT and outcome.location:
                target = urljoin(target, outcome.location)
                pause = 0.0
                continue
            target = url  # after a redirect's result URL answered "not ready", start over
            if self.cancel.wait(min(pause, max(0.0, deadline - time.monotonic()))):
                raise UnavailableError("the wake was cancelled", "")
            pause = min(MAX_PAUSE, max(FIRST_PAUSE, pause * 1.5))

    def _check_alive(self, deadline: float) -> None:
        request = self.request
        why = request.failure()
        if why:
            raise UnavailableError(
                f"the server process died while waking: {why}",
                "fix the command or its environment (see the log lines above)",
            )
        if self.cancel.is_set():
            raise UnavailableError("the wake was cancelled", "")
        if time.monotonic() >= deadline:
            logs = f"; its logs: `{request.logs}`" if request.logs else ""
            raise UnavailableError(
                f"{request.root_url} did not become ready within {request.timeout:g}s "
                f"(last answer: {self.state.last})",
                "raise wake_timeout / --vllm-wake-timeout for slow cold starts, check that the "
                f"endpoint is deployed and healthy{logs}, or pass --vllm-unavailable=skip",
            )

    def _config_error(self, phase: str, status: int | None, outcome: Outcome) -> ConfigError:
        request = self.request
        if status in (401, 403) and not outcome.problem.startswith("the endpoint answered"):
            where = (
                f"{request.base_url}/models" if phase == "models" else f"{request.root_url}/health"
            )
            if request.api_key:
                return ConfigError(
                    f"{where} answered {status}: the key in {request.api_key_env} was rejected",
                    f"set {request.api_key_env} to the API key the server was started with",
                )
            return ConfigError(
                f"{where} answered {status}: no API key was sent because "
                f"{request.api_key_env} is not set",
                f"export {request.api_key_env}=<the server's API key> (or put it in .env)",
            )
        return ConfigError(f"{outcome.problem} ({request.base_url})", outcome.fix)

    def _model_from(self, body: str) -> str | None:
        try:
            data: Any = json.loads(body)
            served = [str(item["id"]) for item in data["data"]]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"GET {self.request.base_url}/models did not answer an OpenAI model list",
                "check that the base URL points at an OpenAI-compatible server",
            ) from None
        wanted = self.request.model
        if wanted:
            if wanted not in served:
                raise ConfigError(
                    f"model {wanted!r} is not served at {self.request.base_url} "
                    f"(it serves: {', '.join(served) or 'nothing'})",
                    f"set model = {served[0]!r} on the platform, or serve {wanted!r}"
                    if served
                    else f"serve {wanted!r} there",
                )
            return wanted
        if not served:
            raise ConfigError(
                f"{self.request.base_url}/models lists no model",
                "set model = '...' on the platform",
            )
        return served[0]


def wake_all(
    requests: Sequence[WakeRequest],
    *,
    on_progress: Callable[[list[WakeState]], None] | None = None,
    interval: float = 0.25,
    fail_fast: bool = False,
) -> dict[str, WakeResult | PlatformError]:
    """Wake every endpoint at once, each in its own thread; report progress from this thread.

    Returns the result or the error of each platform. With `fail_fast`, the first error
    cancels the other wakes. A Ctrl-C here cancels every wake.
    """
    # Imported here, in the calling thread, before any wake starts its clock: an import
    # running in another thread (the plugin pre-imports openai meanwhile) must not hold a
    # wake thread on the import lock.
    import httpx  # noqa: F401

    cancel = threading.Event()
    wakers = [Waker(request, cancel=cancel) for request in requests]
    results: dict[str, WakeResult | PlatformError] = {}

    def run(waker: Waker) -> None:
        try:
            results[waker.request.platform] = waker.run()
        except PlatformError as error:
            results[waker.request.platform] = error
        except Exception as error:  # a bug must not hang the session: report it as a failure
            results[waker.request.platform] = UnavailableError(
                f"the wake failed unexpectedly: {type(error).__name__}: {error}",
                "",
                platform=waker.request.platform,
            )

    threads = [
        threading.Thread(
            target=run, args=(waker,), name=f"vllm-wake-{waker.request.platform}", daemon=True
        )
        for waker in wakers
    ]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            if fail_fast and any(isinstance(r, PlatformError) for r in list(results.values())):
                cancel.set()
                break
            if on_progress is not None:
                on_progress([waker.state for waker in wakers])
            for thread in threads:
                thread.join(timeout=interval / len(threads))
    except BaseException:
        cancel.set()
        raise
    if on_progress is not None:
        on_progress([waker.state for waker in wakers])
    for waker in wakers:  # wakes cancelled by another platform's failure
        name = waker.request.platform
        results.setdefault(
            name,
            UnavailableError(
                "the wake was cancelled after another platform failed", "", platform=name
            ),
        )
    return results
