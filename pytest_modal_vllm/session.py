"""The lifecycle of the selected platforms: start, wake together, keep alive, stop.

Both the pytest plugin and the `modal-vllm` command drive platforms through `EndpointSession`,
so that they cannot drift apart. Order of `start()`:
1. each provider starts (deploys, spawns or locates), one after the other;
2. all started platforms are woken at once (`wake.wake_all`);
3. keep-alive starts for each woken platform.
`close()` undoes all of it, in reverse, and is safe to call at any point and twice.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from .endpoint import Endpoint
from .errors import DefinitionError, PlatformError, SettingUnreadable
from .keepalive import AutoscalerKeepAlive, KeepAlive, PingKeepAlive
from .platforms import Platform
from .providers import make_provider
from .providers.base import Provider
from .providers.process import ProcessWatch
from .resolution import ClientOptions, ResolvedPlatform
from .wake import Waker, WakeRequest, WakeResult, WakeState, wake_all

if TYPE_CHECKING:
    from .leases import LeaseBook
    from .providers.modal import ModalProvider

# --vllm-no-wake with no model set: how long the one look for the served model may take.
NO_WAKE_TIMEOUT = 10.0
# Replays have nothing to wake: a request that reaches the network finds it gone at once.
REPLAY_WAKE_TIMEOUT = 1.0


@dataclass
class PlatformRun:
    """One selected platform in this session and what became of it."""

    platform: ResolvedPlatform
    provider: Provider | None = None
    # The wake of the started platform: used before collection and for every re-wake.
    wake: WakeRequest | None = None
    endpoint: Endpoint | None = None
    error: PlatformError | None = None
    keepalive: KeepAlive | None = None

    @property
    def name(self) -> str:
        """The platform name."""
        return self.platform.name


@dataclass(frozen=True)
class ReadyPlatform:
    """A woken platform as the tests' process sees it: its endpoint, how to build clients
    for it, and the wake to repeat when it goes cold mid-session."""

    endpoint: Endpoint
    client: ClientOptions
    wake: WakeRequest
    # A process server's watch, for processes that are not its parent (xdist workers).
    watch: ProcessWatch | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `workerinput` (secrets included: workers need them)."""
        # Not asdict(): it would deep-copy the failure check (a provider's bound method).
        wake = {f.name: getattr(self.wake, f.name) for f in fields(self.wake) if f.init}
        del wake["failure"]
        wake["headers"] = dict(self.wake.headers)
        return {
            "endpoint": self.endpoint.to_dict(),
            "client": {**asdict(self.client), "extra_body": dict(self.client.extra_body)},
            "wake": wake,
            "watch": asdict(self.watch) if self.watch is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadyPlatform:
        """The inverse of `to_dict`; the wake's dead-process check is the watch."""
        watch = ProcessWatch(**data["watch"]) if data["watch"] else None
        wake = WakeRequest(**data["wake"], failure=watch or (lambda: None))
        client = ClientOptions(**data["client"])
        return cls(Endpoint.from_dict(data["endpoint"]), client, wake, watch)


def replay(platforms: Sequence[Platform], paths: Sequence[Path]) -> dict[str, ReadyPlatform]:
    """The platforms as recorded beside the cassettes under `paths` (`--record-mode=none`):
    nothing is resolved, started or woken, so no credential or variable is needed."""
    from .recording import recorded_endpoints

    endpoints = recorded_endpoints(paths, [platform.name for platform in platforms])
    return {
        platform.name: ReadyPlatform(
            endpoints[platform.name],
            ClientOptions.from_table(platform.client),
            # A cassette answers, or the test fails saying why; nothing wakes.
            WakeRequest(platform.name, endpoints[platform.name].base_url, REPLAY_WAKE_TIMEOUT),
        )
        for platform in platforms
    }


class EndpointSession:
    """Starts, wakes, keeps alive and stops a set of resolved platforms."""

    def __init__(
        self,
        platforms: Sequence[ResolvedPlatform],
        *,
        no_wake: bool = False,
        log_dir: Path | None = None,
        **provider_options: Any,
    ) -> None:
        """`provider_options` reach the providers that take them (`sdk` for modal ones)."""
        self.runs = [PlatformRun(platform) for platform in platforms]
        self.no_wake = no_wake
        # Lines for the user: what a provider decided, keep-alive fallbacks ("NAME: ...").
        self.notes: list[str] = []
        self.provider_options = {"log_dir": log_dir, **provider_options}
        self._closed = False
        self._previous_sigterm: Any = None

    # ------------------------------------------------------------------ start

    def start(
        self,
        *,
        fail_fast: bool = True,
        on_progress: Callable[[list[WakeState]], None] | None = None,
    ) -> None:
        """Start and wake every platform. With `fail_fast`, the first error is raised at once
        (after the other wakes are cancelled); otherwise errors are kept in `run.error`.
        The caller must call `close()` in any case."""
        self._trap_sigterm()
        for run in self.runs:
            try:
                run.provider = make_provider(run.platform, **self.provider_options)
                provider = run.provider
                try:
                    url = provider.start()
                finally:
                    self.notes += [f"{run.name}: {note}" for note in provider.notes]
                run.wake = WakeRequest.of(run.platform, url, provider.failure, provider.wake_note)
            except PlatformError as error:
                run.error = error.for_platform(run.name)
                if fail_fast or isinstance(error, DefinitionError):
                    raise run.error from None
        started = [run for run in self.runs if run.wake is not None]
        if self.no_wake:
            for run in started:
                self._finish(run, self._unwoken(run))
        else:
            results = wake_all(
                [run.wake for run in started if run.wake is not None],
                on_progress=on_progress,
                fail_fast=fail_fast,
            )
            for run in started:
                outcome = results[run.name]
                if isinstance(outcome, PlatformError):
                    run.error = outcome
                else:
                    self._finish(run, outcome)
        if fail_fast:
            for run in self.runs:
                if run.error is not None:
                    raise run.error
        for run in self.runs:
            if run.endpoint is not None:
                self._start_keepalive(run)

    def _unwoken(self, run: PlatformRun) -> WakeResult:
        """--vllm-no-wake: the endpoint is used as it is; only the model must be known."""
        assert run.wake is not None
        if run.platform.model:
            return WakeResult(run.platform.model, 0.0, False, 0)
        # A short look at /v1/models, without a long wait: the user asked not to wait.
        return Waker(replace(run.wake, timeout=NO_WAKE_TIMEOUT)).run()

    def _finish(self, run: PlatformRun, result: WakeResult) -> None:
        assert run.wake is not None
        run.endpoint = Endpoint(
            platform=run.name,
            base_url=run.wake.base_url,
            model=result.model,
            api_key=run.platform.api_key,
            headers=dict(run.platform.headers),
            wake_seconds=result.seconds,
            cold=result.cold,
        )

    def _start_keepalive(self, run: PlatformRun) -> None:
        assert run.endpoint is not None
        mode = run.platform.keep_alive.value
        if mode == "off":
            return
        if run.platform.kind == "modal" and run.platform.modal_mode != "ephemeral":
            # A deployed app is shared: keep it warm with a lease beside every other session.
            # (`make_provider` gave a modal platform its `ModalProvider`.)
            provider = cast("ModalProvider", run.provider)
            try:
                keepalive = self._start_ping(run, provider.lease_book(mode))
                self.notes += [f"{run.name}: {note}" for note in keepalive.notes]
                keepalive.notes.clear()
                return
            except PlatformError as error:  # the lease Dict cannot be reached or written
                self.notes.append(
                    f"{run.name}: WARNING: the shared lease cannot be used ({error.problem}); "
                    "this session keeps the app warm on its own"
                )
                if run.keepalive is not None:  # a half-taken lease is given back
                    self._stop_quietly(run.keepalive)
                run.keepalive = None
        if mode == "ping":
            self._start_ping(run)
        elif mode == "autoscaler":
            pin = AutoscalerKeepAlive(run.provider)  # type: ignore[arg-type]
            run.keepalive = pin  # before start(): a failing pin is still undone by close()
            try:
                pin.start()
            except SettingUnreadable as error:
                self.notes.append(
                    f"{run.name}: WARNING: keep-alive 'autoscaler' fell back to 'ping': "
                    f"{error.problem}; {error.fix}"
                )
                run.keepalive = None
                self._start_ping(run)

    @staticmethod
    def _stop_quietly(keepalive: KeepAlive) -> None:
        try:
            keepalive.stop()
        except PlatformError:
            pass  # the lease store failed already; the warning said so

    @staticmethod
    def _start_ping(run: PlatformRun, book: LeaseBook | None = None) -> PingKeepAlive:
        """Ping `run`'s endpoint (renewing the lease of `book`, if any) until it is stopped."""
        assert run.endpoint is not None
        keepalive = PingKeepAlive(
            run.name,
            run.endpoint.root_url,
            run.platform.keep_alive_interval,
            run.endpoint.headers,
            book,
        )
        run.keepalive = keepalive  # before start(): a half-taken lease is still given back
        return keepalive.start()

    # ------------------------------------------------------------------ results

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """The woken endpoints by platform name."""
        return {run.name: run.endpoint for run in self.runs if run.endpoint is not None}

    def ready(self) -> dict[str, ReadyPlatform]:
        """The woken platforms, as tests and xdist workers need them."""
        return {
            run.name: ReadyPlatform(
                run.endpoint,
                run.platform.client,
                run.wake,
                # Only a process server has a watch (duck-typed: one kind needs it).
                getattr(run.provider, "watch", lambda: None)(),
            )
            for run in self.runs
            if run.endpoint is not None and run.wake is not None
        }

    @property
    def errors(self) -> dict[str, PlatformError]:
        """The platforms that could not be started or woken, with why."""
        return {run.name: run.error for run in self.runs if run.error is not None}

    def keep_alive_pings(self) -> dict[str, int]:
        """Keep-alive pings sent so far, by platform."""
        return {run.name: run.keepalive.pings if run.keepalive else 0 for run in self.runs}

    # ------------------------------------------------------------------ stop

    def close(self) -> list[str]:
        """Stop keep-alive (restoring the autoscaler) and every provider. Returns problems
        met while stopping (each already handled as far as possible) and what the shared
        leases did meanwhile; idempotent."""
        problems: list[str] = []
        if self._closed:
            return problems
        self._closed = True
        for run in reversed(self.runs):
            for what, action in (("keep-alive", run.keepalive), ("provider", run.provider)):
                if action is None:
                    continue
                try:
                    action.stop()
                except BaseException as error:  # keep stopping the rest, even on Ctrl-C
                    problems.append(f"{run.name}: stopping its {what} failed: {error}")
            if run.keepalive is not None:
                problems += [f"{run.name}: {note}" for note in run.keepalive.notes]
            run.keepalive = None
        self._restore_sigterm()
        return problems

    def _trap_sigterm(self) -> None:
        """Turn SIGTERM into KeyboardInterrupt while platforms run, so cleanup happens."""
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        self._previous_sigterm = signal.signal(signal.SIGTERM, interrupt)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None and (
            threading.current_thread() is threading.main_thread()
        ):
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
