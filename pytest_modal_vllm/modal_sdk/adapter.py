"""The adapter: `ModalSDK`, each method one or two Modal SDK calls; `load_sdk()`, its seam."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, cast

from ..errors import ConfigError
from .app_file import load_app_file
from .translate import modal_errors
from .values import (
    ADAPTER_ENV,
    FINGERPRINT_TAG,
    Autoscaler,
    LeaseStore,
    ModalStatus,
    ModalTarget,
    NotDeployedError,
    lease_dict_name,
)


class ModalBackend(Protocol):
    """What the modal provider and the CLI need from Modal; `ModalSDK` is the real one."""

    def locate(self, target: ModalTarget) -> str:
        """The URL of a deployed web function or server; `NotDeployedError` if there is none."""
        ...

    def deploy(
        self,
        app_file: Path,
        deploy_env: Mapping[str, str],
        target: ModalTarget,
        fingerprint: str,
    ) -> None:
        """Deploy the app defined in `app_file` under the target's app name, tagged with
        `fingerprint` (read back by `status`)."""
        ...

    def ephemeral(
        self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget
    ) -> AbstractContextManager[str]:
        """Run the app as an ephemeral Modal app while the context is open; yields the URL."""
        ...

    def autoscaler(self, target: ModalTarget) -> Autoscaler:
        """The current autoscaler settings; `UnavailableError` when they cannot be read."""
        ...

    def update_autoscaler(
        self,
        target: ModalTarget,
        *,
        min_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> None:
        """Override the given settings (None: leave unchanged); a redeploy wipes overrides."""
        ...

    def leases(self, target: ModalTarget) -> LeaseStore:
        """The app's lease store (created on first use)."""
        ...

    def stop_app(self, target: ModalTarget) -> bool:
        """Stop a deployed app: True if it was stopped, False if it was not deployed."""
        ...

    def status(self, target: ModalTarget) -> ModalStatus:
        """Deployed or not, URL, containers, backlog, proxy auth, fingerprint; wakes nothing."""
        ...


class ModalSDK:
    """The real adapter: each method is one or two Modal SDK calls, errors translated."""

    def __init__(self) -> None:
        # Local handles of running ephemeral apps: such apps cannot be looked up by name, so
        # autoscaler calls use these instead.
        self._ephemeral_handles: dict[ModalTarget, Any] = {}

    # -- lookups

    def _remote_handle(self, target: ModalTarget) -> Any:
        local = self._ephemeral_handles.get(target)
        if local is not None:
            return local
        import modal

        # `from_name` is lazy: the first live method (get_web_url, autoscaler...) looks it up.
        if target.server:
            return modal.Server.from_name(
                target.app, target.server, environment_name=target.environment
            )
        return modal.Function.from_name(
            target.app, target.name, environment_name=target.environment
        )

    @staticmethod
    def _url_of(handle: Any, target: ModalTarget) -> str:
        import modal

        url = handle.get_url() if isinstance(handle, modal.Server) else handle.get_web_url()
        if not url:
            raise ConfigError(
                f"the {target.describe()} has no web URL",
                "point the platform at a @modal.web_server function (function = ...) or an "
                "@app.server class (server = ...)",
            )
        return str(url).rstrip("/")

    def locate(self, target: ModalTarget) -> str:
        """The URL of a deployed web function or server; `NotDeployedError` if there is none."""
        with modal_errors("looking up", target):
            return self._url_of(self._remote_handle(target), target)

    def status(self, target: ModalTarget) -> ModalStatus:
        """Deployed or not, URL, containers, backlog, proxy auth, fingerprint.

        Control-plane calls only (`get_current_stats`, `info`, the app's tags): for a web
        endpoint any HTTP request is demand and would start a container; these do not.
        """
        import modal

        try:
            with modal_errors("looking up", target):
                handle = self._remote_handle(target)
                url = self._url_of(handle, target)
        except NotDeployedError as error:
            return ModalStatus(deployed=False, url=None, detail=error.problem)
        with modal_errors("reading the state of", target):
            if isinstance(handle, modal.Server):
                # A Server has no get_current_stats: its registered containers are the count.
                containers: int | None = len(handle._experimental_list_containers())
                backlog = None
                proxy_auth: bool | None = not handle.info().unauthenticated
            else:
                stats = handle.get_current_stats()
                containers, backlog = stats.num_total_runners, stats.backlog
                web = handle.info().web_info
                proxy_auth = None if web is None else not web.unauthenticated
            tags = {} if target in self._ephemeral_handles else self._app(target).get_tags()
        return ModalStatus(
            deployed=True,
            url=url,
            containers=containers,
            backlog=backlog,
            proxy_auth=proxy_auth,
            fingerprint=tags.get(FINGERPRINT_TAG),
        )

    @staticmethod
    def _app(target: ModalTarget) -> Any:
        import modal

        return modal.App.lookup(target.app, environment_name=target.environment)

    # -- deploy / ephemeral

    def deploy(
        self,
        app_file: Path,
        deploy_env: Mapping[str, str],
        target: ModalTarget,
        fingerprint: str,
    ) -> None:
        """Import `app_file` with `deploy_env`, `app.deploy(name=...)` with Modal's output
        shown, then tag the app with `fingerprint` (`status` reads it back)."""
        import modal

        loaded = load_app_file(app_file, deploy_env)
        with modal_errors("deploying", target, lookup=False):
            with modal.enable_output():
                loaded.app.deploy(name=target.app, environment_name=target.environment)
            loaded.app.set_tags({**loaded.app.get_tags(), FINGERPRINT_TAG: fingerprint})

    @contextlib.contextmanager
    def ephemeral(
        self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget
    ) -> Iterator[str]:
        """Run the app as an ephemeral Modal app while the context is open; yields the URL.

        The app stops when the context closes, also on an exception or Ctrl-C. Modal's output
        (the image build, then the container's logs) is shown while it runs.
        """
        import modal

        loaded = load_app_file(app_file, deploy_env)
        handle = loaded.handle(target)
        # Closed in `finally` with no exception handed in, whatever happened: Modal's run
        # context swallows a KeyboardInterrupt passed to its exit, and Ctrl-C must reach pytest.
        stack = contextlib.ExitStack()
        try:
            with modal_errors("starting an ephemeral run", target, lookup=False):
                # Build logs, then the container's logs for as long as the run lasts.
                stack.enter_context(modal.enable_output())
                stack.enter_context(loaded.app.run(environment_name=target.environment))
                url = self._url_of(handle, target)
            self._ephemeral_handles[target] = handle
            yield url
        finally:
            self._ephemeral_handles.pop(target, None)
            with modal_errors("stopping the ephemeral run", target, lookup=False):
                stack.close()

    # -- autoscaler

    def autoscaler(self, target: ModalTarget) -> Autoscaler:
        """`<handle>.autoscaler.settings()`: a control-plane call, it wakes nothing."""
        with modal_errors("reading the autoscaler settings", target):
            settings = self._remote_handle(target).autoscaler.settings()
            window = settings.scaledown_window
            return Autoscaler(int(settings.min_containers or 0), int(window) if window else None)

    def update_autoscaler(
        self,
        target: ModalTarget,
        *,
        min_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> None:
        """`<handle>.autoscaler.update(...)` with only the given settings (an omitted one is
        unchanged; note that Modal reads an explicit `None` as 0)."""
        changes = {"min_containers": min_containers, "scaledown_window": scaledown_window}
        with modal_errors("updating the autoscaler", target):
            self._remote_handle(target).autoscaler.update(
                **{key: value for key, value in changes.items() if value is not None}
            )

    def leases(self, target: ModalTarget) -> LeaseStore:
        """The app's `modal.Dict` (`lease_dict_name`), created if missing, in its environment."""
        return _ModalDict(target)

    # -- stop

    def stop_app(self, target: ModalTarget) -> bool:
        """Stop a deployed app: True if stopped, False if no such app is deployed."""
        from modal import exception as mx

        with modal_errors("stopping", target, lookup=False):
            try:
                app = self._app(target)
            except mx.NotFoundError:
                return False
            app.stop()
            return True


class _ModalDict:
    """A `LeaseStore` on a named `modal.Dict` (values are pickled by Modal)."""

    def __init__(self, target: ModalTarget) -> None:
        self.target = target
        self._dict: Any = None

    def _handle(self) -> Any:
        import modal

        if self._dict is None:
            self._dict = modal.Dict.from_name(
                lease_dict_name(self.target),
                environment_name=self.target.environment,
                create_if_missing=True,
            )
        return self._dict

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        """`Dict.put` (atomic create with `skip_if_exists`)."""
        with modal_errors("writing a lease of", self.target, lookup=False):
            return bool(self._handle().put(key, value, skip_if_exists=skip_if_exists))

    def get(self, key: str) -> Any:
        """`Dict.get`."""
        with modal_errors("reading a lease of", self.target, lookup=False):
            return self._handle().get(key)

    def pop(self, key: str) -> Any:
        """`Dict.pop` (None when absent)."""
        with modal_errors("removing a lease of", self.target, lookup=False):
            return self._handle().pop(key, None)

    def items(self) -> list[tuple[str, Any]]:
        """`Dict.items`."""
        with modal_errors("reading the leases of", self.target, lookup=False):
            return list(self._handle().items())


def load_sdk() -> ModalBackend:
    """The Modal adapter: `ModalSDK()`, or the test double named by `MODAL_VLLM_SDK_ADAPTER`.

    `MODAL_VLLM_SDK_ADAPTER="package.module:attr"` names a class or factory that is called
    without arguments. This is a testing seam: the plugin's tests use it to run whole pytest
    sessions (in subprocesses) against a fake Modal.
    """
    spec = os.environ.get(ADAPTER_ENV, "").strip()
    if not spec:
        return ModalSDK()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{ADAPTER_ENV}={spec!r} is not of the form 'module:attr'",
            f"unset {ADAPTER_ENV} (it is a testing seam), or write it as package.module:Name",
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"{ADAPTER_ENV}={spec!r} cannot be loaded: {error}",
            f"unset {ADAPTER_ENV} (it is a testing seam), or make the module importable",
        ) from error
    return cast(ModalBackend, target() if callable(target) else target)
