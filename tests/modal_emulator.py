"""`ModalEmulator`: a `StubServer` that behaves like a Modal web endpoint, with fault switches.

The stand-in for Modal's side of the network in the plugin's tests and benchmarks (with the
fake SDK adapter of `fake_modal.py`); not shipped, users get the plain `StubServer`. Run it as
a process (`python tests/modal_emulator.py --help`) or start it in process.

The emulated container boots (cold start), holds requests while it boots (or answers 503, or
refuses), redirects a request held longer than `redirect_after` with `303 See Other` to a
result URL, scales to zero after `scaledown_window` idle seconds, boots again on the next
request and bills container seconds. In front of it, Modal's proxy checks `Modal-Key` and
`Modal-Secret`. Fault switches: random failures (503 or connection reset), slow replies, a
`/health` that never answers, boots that fail (`startup_exit`), and `die()`.

Under `/__modal/` the same port serves a stand-in for Modal's control plane (not its web
proxy: never demand, no proxy auth, no API key, counted apart in `control_requests`):

- `GET /__modal/stats`: `{"num_total_runners", "backlog", "num_running_inputs"}`;
- `GET /__modal/autoscaler`: the effective `{"min_containers", "max_containers",
  "buffer_containers", "scaledown_window"}` (a `null` window: never scaled down); `POST` a JSON
  object to override some of them (`update_autoscaler()`), 400 `{"error"}` if one is bad;
- `POST /__modal/redeploy`: a rolling redeploy (see `redeploy()`).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pytest_modal_vllm.stub.server import (
    BOOTING,
    NEW,
    READY,
    STOPPED,
    Behaviour,
    Gone,
    Request,
    Stats,
    StubServer,
)
from pytest_modal_vllm.stub.transport import reset, send, send_json, send_text

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

COLD_STYLES = ("refuse", "503", "hold", "refuse-then-503")
FAIL_MODES = ("503", "reset")
PROXY_AUTH_MISSING = "modal-http: missing credentials for proxy authorization"
PROXY_AUTH_INVALID = "modal-http: invalid credentials for proxy authorization"
RESULT_PREFIX = "/__result/"
CONTROL_PREFIX = "/__modal/"
AUTOSCALER_KEYS = ("min_containers", "max_containers", "buffer_containers", "scaledown_window")
# Container states the emulator adds: scaled to zero, and dead for good.
DOWN, DEAD = "down", "dead"


@dataclass
class EmulatorBehaviour(Behaviour):
    """The plain stub's switches plus Modal's and the faults. The defaults: all off."""

    #: "refuse" | "503" | "hold" | "refuse-then-503" (refuse the first half, then 503).
    #: Refusing applies to the first boot only; a wake-up after scale-to-zero answers 503
    #: (or holds, with "hold"), as Modal's always-up proxy does.
    cold_style: str = "refuse-then-503"
    #: A request held longer than this gets `303 See Other` to `/__result/<id>` (Modal: 150 s).
    redirect_after: float | None = None
    #: (key, secret): every path requires `Modal-Key`/`Modal-Secret` headers (Modal proxy auth).
    proxy_auth: tuple[str, str] | None = field(default=None, repr=False)
    #: The container stops after this many idle seconds (`None`: never).
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
    #: Every boot fails after `cold_start` seconds, as if the server inside exited during
    #: start-up with this message; `None`: boots succeed.
    startup_exit: str | None = None
    #: The deployed autoscaler settings (`scaledown_window` above is the fourth one).
    min_containers: int = 0
    max_containers: int | None = None
    buffer_containers: int = 0
    #: `GET /__modal/autoscaler` answers 503: the settings cannot be read.
    autoscaler_unreadable: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cold_style not in COLD_STYLES:
            raise ValueError(f"cold_style must be one of {COLD_STYLES}, got {self.cold_style!r}")
        if self.fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, got {self.fail_mode!r}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be between 0 and 1, got {self.fail_rate!r}")
        if self.response_delay < 0:
            raise ValueError(f"response_delay must be >= 0, got {self.response_delay!r}")
        for name in ("redirect_after", "scaledown_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if self.proxy_auth is not None and len(self.proxy_auth) != 2:
            raise ValueError("proxy_auth must be a (key, secret) pair")
        deployed = check_autoscaler({key: getattr(self, key) for key in AUTOSCALER_KEYS[:3]})
        _check_bounds(deployed)
        for key, value in deployed.items():
            setattr(self, key, value)


def check_autoscaler(changes: Mapping[str, object]) -> dict[str, Any]:
    """Autoscaler settings as Modal takes them, checked; `ValueError` with a one-line reason.

    Integers >= 0 (`max_containers` >= 1); `null` means 0 for `min_containers` and
    `buffer_containers` and no bound for `max_containers`; `scaledown_window` is a number of
    seconds in 2..3600.
    """
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in AUTOSCALER_KEYS:
            raise ValueError(f"unknown key {key!r} (valid: {', '.join(AUTOSCALER_KEYS)})")
        least = 1 if key == "max_containers" else 0
        if key == "scaledown_window":
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 2 <= value <= 3600
            ):
                raise ValueError(f"scaledown_window must be a number in 2..3600, got {value!r}")
        elif value is None:
            value = None if key == "max_containers" else 0
        elif isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} must be an integer >= {least} or null, got {value!r}")
        checked[key] = value
    return checked


def _check_bounds(settings: Mapping[str, Any]) -> None:
    low, high = settings["min_containers"], settings["max_containers"]
    if high is not None and low > high:
        raise ValueError(f"min_containers ({low}) exceeds max_containers ({high})")


@dataclass
class EmulatorStats(Stats):
    """The stub's counters plus the emulator's: faults, redirects and billed seconds."""

    #: Requests failed on purpose by `fail_rate`.
    injected_failures: int = 0
    #: 303 answers sent to held requests.
    redirects: int = 0
    #: Boots that failed (`startup_exit`).
    failed_boots: int = 0
    #: Rolling redeploys (`POST /__modal/redeploy`).
    deploys: int = 0
    #: Control API requests (`/__modal/*`); they count nowhere else.
    control_requests: int = 0
    #: The idle seconds of each scale-down for idleness (last activity to going down).
    scale_downs: list[float] = field(default_factory=list)
    _closed_seconds: float = field(default=0.0, init=False, repr=False)
    _up_since: float | None = field(default=None, init=False, repr=False)

    @property
    def container_seconds(self) -> float:
        """Billed seconds: every container lifetime from boot start to scale-down, or to now."""
        with self._lock:
            return self._billed(time.monotonic())

    def billed_seconds(self) -> float:
        """The same as `container_seconds`, as a method."""
        return self.container_seconds

    def _snapshot_locked(self, now: float) -> dict[str, Any]:
        return {**super()._snapshot_locked(now), "container_seconds": self._billed(now)}

    def _billed(self, now: float) -> float:
        running = now - self._up_since if self._up_since is not None else 0.0
        return self._closed_seconds + running

    def _bill(self, now: float, running: bool) -> None:
        """Close the billed time up to `now`; bill from now on while `running`."""
        with self._lock:
            self._closed_seconds = self._billed(now)
            self._up_since = now if running else None


class ModalEmulator(StubServer):
    """A `StubServer` whose container acts like a Modal web endpoint's (see the module)."""

    FINAL_STATES: ClassVar[tuple[str, ...]] = (STOPPED, DEAD)
    STATS: ClassVar[type[Stats]] = EmulatorStats
    behaviour: EmulatorBehaviour
    stats: EmulatorStats

    def __init__(self, *, behaviour: EmulatorBehaviour | None = None, **options: Any) -> None:
        """`options`: `host`, `port`, `model` and `script`, as for `StubServer`."""
        behaviour = behaviour if behaviour is not None else EmulatorBehaviour()
        super().__init__(behaviour=behaviour, **options)
        self._rng = random.Random(behaviour.seed)
        self._inflight = 0
        self._held = 0  # requests waiting for a container
        self._last_activity = 0.0
        self._pending: dict[str, Request] = {}
        self._overrides: dict[str, Any] = {}  # autoscaler settings set through the control API
        self._boots = 0  # the number of the latest boot
        self._failed_boot: int | None = None  # the number of the latest boot that failed

    def scale_to_zero(self) -> None:
        """Stop the container now; the next request starts a new cold start."""
        with self._cond:
            if self._state in (BOOTING, READY):
                self._enter_locked(DOWN, time.monotonic())

    def die(self) -> None:
        """The endpoint dies for good: connections are refused from now on."""
        with self._cond:
            if self._state in (DEAD, STOPPED, NEW):
                if self._state == NEW:
                    self._state = DEAD
                return
            self._enter_locked(DEAD, time.monotonic())
        self._listener.close()
        self._listener.cut(socket.SHUT_RDWR)

    def current_stats(self) -> dict[str, Any]:
        """Like Modal's `get_current_stats()`: containers up (booting or ready), requests waiting
        for a container, requests being served; and, as `Function.info().web_info` tells,
        whether the proxy demands credentials."""
        with self._cond:
            up = int(self._state in (BOOTING, READY))
            return {
                "num_total_runners": up,
                "backlog": self._held,
                "num_running_inputs": self._inflight,
                "requires_proxy_auth": self.behaviour.proxy_auth is not None,
            }

    def autoscaler(self) -> dict[str, Any]:
        """The effective autoscaler settings: the deployed ones overlaid with the overrides."""
        with self._cond:
            return self._autoscaler_locked()

    def update_autoscaler(self, changes: Mapping[str, object]) -> dict[str, Any]:
        """Override some autoscaler settings (see `check_autoscaler`); return the effective ones.

        While `min_containers` >= 1, a container that is down boots at once (unless its last boot
        failed: then the next request retries) and is never scaled down for idleness. A new
        `scaledown_window` applies at once to the idle clock of the current container: one idle
        for longer than the new window goes down now.
        """
        checked = check_autoscaler(changes)
        with self._cond:
            settings = {**self._autoscaler_locked(), **checked}
            _check_bounds(settings)
            self._overrides.update(checked)
            self._tick_locked(time.monotonic())
            self._cond.notify_all()  # the clock thread re-reads the settings
            return settings

    def redeploy(self) -> int:
        """A rolling redeploy, as Modal does it: the warm container is drained (goes down, its
        billing ends) and every autoscaler override is wiped; the next request boots the new
        version (at once if the deployed `min_containers` >= 1). Returns the deploys so far."""
        with self._cond:
            now = time.monotonic()
            if self._state in (BOOTING, READY):
                self._enter_locked(DOWN, now)
            self._overrides.clear()
            self._failed_boot = None
            self.stats._add(deploys=1)
            self._tick_locked(now)
            self._cond.notify_all()
        return self.stats.deploys

    # -- StubServer hooks ------------------------------------------------------------------

    def _refusing_seconds(self) -> float:
        cold, style = self.behaviour.cold_start, self.behaviour.cold_style
        return {"refuse": cold, "refuse-then-503": cold / 2}.get(style, 0.0)

    def _count(self, request: Request) -> None:
        if request.path.startswith(CONTROL_PREFIX):
            self.stats._add(control_requests=1)
        elif request.path.startswith(RESULT_PREFIX):
            self.stats._count_request("/__result")
        else:
            super()._count(request)

    def _enter_locked(self, state: str, now: float) -> None:
        if state == BOOTING:
            self._boots += 1
        if state == READY:
            self._last_activity = now
        self.stats._bill(now, running=state in (BOOTING, READY))
        super()._enter_locked(state, now)

    def _tick_locked(self, now: float) -> float | None:
        settings = self._autoscaler_locked()
        warm = settings["min_containers"] >= 1
        if warm and self._state == DOWN and self._failed_boot != self._boots:
            self._enter_locked(BOOTING, now)  # min_containers: a container boots at once
        wait = super()._tick_locked(now)
        window = settings["scaledown_window"]
        if self._state == READY and not warm and window is not None and self._inflight == 0:
            idle = now - self._last_activity
            if idle >= window:
                with self.stats._lock:
                    self.stats.scale_downs.append(idle)
                self._enter_locked(DOWN, now)
            else:
                wait = window - idle if wait is None else min(wait, window - idle)
        return wait

    def _boot_finished_locked(self, now: float) -> None:
        if self.behaviour.startup_exit is None:
            super()._boot_finished_locked(now)
            return
        self._failed_boot = self._boots
        self.stats._add(failed_boots=1)
        self._enter_locked(DOWN, now)

    def _admit(self, h: BaseHTTPRequestHandler, request: Request) -> Request | None:
        """The control API; else Modal's proxy, then the container: hold the request, boot one,
        or redirect."""
        if request.path.startswith(CONTROL_PREFIX):
            self._control(h, request)
            return None
        # Modal's proxy checks its credentials before anything reaches a container.
        proxy = self.behaviour.proxy_auth
        if proxy is not None:
            key, secret = request.headers.get("modal-key"), request.headers.get("modal-secret")
            if key is None or secret is None or (key, secret) != tuple(proxy):
                self.stats._add(unauthorized=1)
                text = PROXY_AUTH_MISSING if key is None or secret is None else PROXY_AUTH_INVALID
                send_text(h, 401, text)
                return None

        if request.path == "/health" and self.behaviour.health_hang:
            self._stop_event.wait()
            raise Gone(stopped=False)  # a hung endpoint never answers, not even now

        target, result_id = request, None
        if request.path.startswith(RESULT_PREFIX):
            result_id = request.path[len(RESULT_PREFIX) :]
            with self._cond:
                pending = self._pending.get(result_id)
            if pending is None:
                send_json(h, 404, {"detail": "Not Found"})
                return None
            if request.method != "GET":
                send_json(h, 405, {"detail": "Method Not Allowed"})
                return None
            target = pending

        verdict = self._wait_for_container(target, request.arrived, result_id)
        if verdict == "500":
            if result_id is not None:
                with self._cond:
                    self._pending.pop(result_id, None)
            send_text(h, 500, f"container exited during startup: {self.behaviour.startup_exit}")
            return None
        if verdict == "503":
            send_json(h, 503, {"error": "starting"})
            return None
        if verdict.startswith("303 "):
            self.stats._add(redirects=1)
            send(h, 303, headers={"Location": RESULT_PREFIX + verdict[4:]})
            return None
        if result_id is not None:
            with self._cond:
                self._pending.pop(result_id, None)
        return target

    def _before_reply(self) -> None:
        delay = self.behaviour.response_delay
        if delay > 0 and self._stop_event.wait(delay):
            raise Gone(stopped=True)

    def _respond(self, h: BaseHTTPRequestHandler, request: Request) -> None:
        """Inject the `fail_rate` faults on `/v1/*`, else answer; then the container idles."""
        try:
            v1 = request.path == "/v1" or request.path.startswith("/v1/")
            if v1 and self.behaviour.fail_rate > 0 and self._draw_failure():
                self.stats._add(injected_failures=1)
                if self.behaviour.fail_mode == "reset":
                    reset(h)
                else:
                    send_json(h, 503, {"error": "injected failure"})
                return
            super()._respond(h, request)
        finally:
            with self._cond:
                self._inflight -= 1
                self._last_activity = time.monotonic()
                self._cond.notify_all()

    # -- the container ---------------------------------------------------------------------

    def _wait_for_container(self, request: Request, arrived: float, result_id: str | None) -> str:
        """Wait for the container: "ok" (in flight), "503", "303 <id>", "500" (the boot it
        waited for failed), or raise `Gone`."""
        redirect_after = self.behaviour.redirect_after
        deadline = None if redirect_after is None else arrived + redirect_after
        boot: int | None = None  # the boot this request waits for
        with self._cond:
            # Any request keeps a Modal container warm, and wakes one that scaled to zero.
            self._last_activity = time.monotonic()
            while True:
                if boot is not None and boot == self._failed_boot:
                    return "500"
                if self._state == DOWN:
                    self._enter_locked(BOOTING, time.monotonic())
                    boot = self._boots
                    self._tick_locked(time.monotonic())
                    continue
                if self._state == READY:
                    self._inflight += 1
                    return "ok"
                if self._state != BOOTING:
                    # Stopped: answer 503 and close; dead: the connection just drops.
                    raise Gone(stopped=self._state == STOPPED)
                # Once listening, every style but "hold" answers 503 during a boot ("refuse" only
                # applies to the first one; read live, so a test may switch styles between boots).
                boot = self._boots
                if self.behaviour.cold_style != "hold":
                    return "503"
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    if result_id is None:
                        self._counter += 1
                        result_id = f"fc-{self._counter:06d}"
                        self._pending[result_id] = request
                    return f"303 {result_id}"
                self._held += 1
                try:
                    self._cond.wait(None if deadline is None else deadline - now)
                finally:
                    self._held -= 1

    def _autoscaler_locked(self) -> dict[str, Any]:
        deployed = {key: getattr(self.behaviour, key) for key in AUTOSCALER_KEYS}
        return {**deployed, **self._overrides}

    def _control(self, h: BaseHTTPRequestHandler, request: Request) -> None:
        """Answer a control API request (`/__modal/...`, see the module)."""
        route = (request.method, request.path[len(CONTROL_PREFIX) :])
        if route == ("GET", "stats"):
            send_json(h, 200, self.current_stats())
        elif route == ("GET", "autoscaler") and self.behaviour.autoscaler_unreadable:
            send_json(h, 503, {"error": "the autoscaler settings cannot be read"})
        elif route == ("GET", "autoscaler"):
            send_json(h, 200, self.autoscaler())
        elif route == ("POST", "autoscaler"):
            try:
                changes = json.loads(request.body or b"null")
            except ValueError:
                changes = None
            try:
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                send_json(h, 200, self.update_autoscaler(changes))
            except ValueError as bad:
                send_json(h, 400, {"error": str(bad)})
        elif route == ("POST", "redeploy"):
            send_json(h, 200, {"deploys": self.redeploy()})
        elif route[1] in ("stats", "autoscaler", "redeploy"):
            send_json(h, 405, {"detail": "Method Not Allowed"})
        else:
            send_json(h, 404, {"detail": "Not Found"})

    def _draw_failure(self) -> bool:
        with self._cond:
            return self._rng.random() < self.behaviour.fail_rate


def serve_until_signal(server: StubServer) -> int:
    """Start `server`, say when it listens, serve until SIGTERM or SIGINT, stop it; 0."""
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


def main(argv: list[str] | None = None) -> int:
    """Run an emulator in the foreground until SIGTERM or SIGINT; return the exit code."""
    import argparse
    from dataclasses import fields

    parser = argparse.ArgumentParser(
        prog="modal_emulator.py", description="A Modal-like OpenAI-compatible endpoint."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="stub")
    parser.add_argument("--script", default=None, help="TOML rules file")
    parser.add_argument("--cold-start", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--cold-style", choices=COLD_STYLES, default="refuse-then-503")
    parser.add_argument("--redirect-after", type=float, default=None)
    parser.add_argument("--proxy-auth", nargs=2, metavar=("KEY", "SECRET"), default=None)
    parser.add_argument("--scaledown-window", type=float, default=None)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-mode", choices=FAIL_MODES, default="503")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--response-delay", type=float, default=0.0)
    parser.add_argument("--health-hang", action="store_true")
    parser.add_argument("--startup-exit", metavar="MESSAGE", help="every boot fails")
    parser.add_argument("--min-containers", type=int, default=0)
    parser.add_argument("--max-containers", type=int, default=None)
    parser.add_argument("--buffer-containers", type=int, default=0)
    parser.add_argument("--autoscaler-unreadable", action="store_true")
    args = parser.parse_args(argv)
    if args.proxy_auth is not None:
        args.proxy_auth = tuple(args.proxy_auth)
    try:
        behaviour = EmulatorBehaviour(
            **{f.name: getattr(args, f.name) for f in fields(EmulatorBehaviour)}
        )
        server = ModalEmulator(
            host=args.host, port=args.port, model=args.model, script=args.script,
            behaviour=behaviour,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    return serve_until_signal(server)


if __name__ == "__main__":
    raise SystemExit(main())
