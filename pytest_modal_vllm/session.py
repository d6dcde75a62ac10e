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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from .endpoint import Endpoint
from .errors import ConfigError, PlatformError
from .keepalive import AutoscalerKeepAlive, KeepAlive, PingKeepAlive
from .platforms import Platform, expand
from .providers import make_provider
from .providers.base import Provider, Target
from .settings import Settings
from .wake import WakeRequest, WakeResult, WakeState, wake_all


@dataclass
class PlatformRun:
    """One selected platform in this session: its effective settings and what became of it."""

    platform: Platform
    wake_timeout: float
    wake_timeout_source: str
    keep_alive: str
    keep_alive_source: str
    keep_alive_interval: float
    provider: Provider | None = None
    target: Target | None = None
    endpoint: Endpoint | None = None
    error: PlatformError | None = None
    keepalive: KeepAlive | None = None

    @property
    def name(self) -> str:
        """The platform name."""
        return self.platform.name


class EndpointSession:
    """Starts, wakes, keeps alive and stops a set of platforms."""

    def __init__(
        self,
        platforms: Sequence[Platform],
        settings: Settings,
        *,
        log_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.runs: list[PlatformRun] = []
        for platform in platforms:
            effective = settings.effective(platform)
            wake_timeout, wake_source = effective["wake_timeout"]
            keep_alive, keep_source = effective["keep_alive"]
            if keep_alive == "autoscaler" and platform.kind != "modal":
                raise ConfigError(
                    f"keep-alive 'autoscaler' ({keep_source}) needs a modal platform, "
                    f"this one is {platform.kind!r}",
                    "use --vllm-keep-alive=ping or off for it",
                    platform=platform.name,
                )
            self.runs.append(
                PlatformRun(
                    platform,
                    float(wake_timeout),
                    wake_source,
                    str(keep_alive),
                    keep_source,
                    platform.keep_alive_interval,
                )
            )
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
                run.provider = make_provider(
                    run.platform,
                    deploy=bool(self.settings["deploy"]),
                    ephemeral=bool(self.settings["ephemeral"]),
                    log_dir=self.log_dir,
                )
                run.target = run.provider.start()
            except PlatformError as error:
                run.error = error.for_platform(run.name)
                if fail_fast:
                    raise run.error from None
        started = [run for run in self.runs if run.error is None and run.target is not None]
        if self.settings["no_wake"]:
            for run in started:
                self._finish(run, self._unwoken(run))
        else:
            requests = [self._wake_request(run) for run in started]
            results = wake_all(requests, on_progress=on_progress, fail_fast=fail_fast)
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

    def _model(self, run: PlatformRun) -> str | None:
        model = run.platform.model
        return expand(run.name, "model", model) or None if model else None

    def _wake_request(self, run: PlatformRun, timeout: float | None = None) -> WakeRequest:
        assert run.target is not None
        assert run.provider is not None
        return WakeRequest(
            platform=run.name,
            base_url=run.target.base_url,
            timeout=run.wake_timeout if timeout is None else timeout,
            model=self._model(run),
            api_key=run.target.api_key,
            api_key_env=run.platform.api_key_env,
            headers=run.target.headers,
            failure=run.provider.failure,
        )

    def _unwoken(self, run: PlatformRun) -> WakeResult:
        """--vllm-no-wake: the endpoint is used as it is; only the model must be known."""
        model = self._model(run)
        if model:
            return WakeResult(model, 0.0, False, 0)
        # One look at /v1/models, without waiting: the user asked not to wait.
        from .wake import Waker

        return Waker(self._wake_request(run, timeout=10.0)).run()

    def _finish(self, run: PlatformRun, result: WakeResult) -> None:
        assert run.target is not None
        run.endpoint = Endpoint(
            platform=run.name,
            base_url=run.target.base_url,
            model=result.model,
            api_key=run.target.api_key,
            headers=dict(run.target.headers),
            wake_seconds=result.seconds,
            cold=result.cold,
            capabilities=tuple(run.platform.capabilities),
            client_options=run.platform.client_options,
            wake_timeout=run.wake_timeout,
            api_key_env=run.platform.api_key_env,
        )

    def _start_keepalive(self, run: PlatformRun) -> None:
        assert run.endpoint is not None
        if run.keep_alive == "ping":
            run.keepalive = PingKeepAlive(
                run.name, run.endpoint.root_url, run.keep_alive_interval, run.endpoint.headers
            ).start()
        elif run.keep_alive == "autoscaler":
            keepalive = AutoscalerKeepAlive(run.provider)  # type: ignore[arg-type]
            run.keepalive = keepalive  # before start(): a failing pin is still undone by close()
            keepalive.start()

    # ------------------------------------------------------------------ results

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """The woken endpoints by platform name."""
        return {run.name: run.endpoint for run in self.runs if run.endpoint is not None}

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
        met while stopping (each already handled as far as possible); idempotent."""
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
