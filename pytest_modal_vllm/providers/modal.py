"""The `modal` kind: a vLLM endpoint served by a Modal web function or server.

`start()` locates the deployed endpoint through the Modal SDK; with `deploy=True` it deploys
the platform's app file first, with `ephemeral=True` it runs the app as an ephemeral Modal app
that lives until `stop()`. URLs always come from the SDK, never built by hand.

The app file is the platform's `modal_app` (a relative path starts at the current directory),
or the bundled `modal_app/vllm_server.py`. It is imported with the platform's `deploy_env`
applied, plus `APP_NAME` set to the platform's `app`, so that the deployed name, the name
looked up and the name the app file gives itself agree.

`pin()`/`unpin()` implement the `autoscaler` keep-alive: `min_containers=1` while the session
runs, then the value read before pinning (0 when it could not be read).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..errors import ConfigError, PlatformError, UnavailableError
from ..modal_sdk import (
    DEFAULT_FUNCTION,
    ModalBackend,
    ModalStatus,
    NotDeployedError,
    bundled_app_file,
    deploy_fix,
    load_sdk,
)
from ..platforms import Platform
from .base import Target, api_key_for

PROXY_TOKEN_ID_ENV = "MODAL_PROXY_TOKEN_ID"
PROXY_TOKEN_SECRET_ENV = "MODAL_PROXY_TOKEN_SECRET"


def proxy_headers(platform: Platform, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`Modal-Key`/`Modal-Secret` for a `proxy_auth` platform ({} otherwise), or `ConfigError`."""
    if not platform.proxy_auth:
        return {}
    env = os.environ if environ is None else environ
    token_id = env.get(PROXY_TOKEN_ID_ENV, "")
    token_secret = env.get(PROXY_TOKEN_SECRET_ENV, "")
    missing = [
        name
        for name, value in ((PROXY_TOKEN_ID_ENV, token_id), (PROXY_TOKEN_SECRET_ENV, token_secret))
        if not value
    ]
    if missing:
        raise ConfigError(
            f"proxy_auth is on, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
            " not set",
            f"create a proxy auth token in the Modal dashboard and export {PROXY_TOKEN_ID_ENV} "
            f"and {PROXY_TOKEN_SECRET_ENV} (or put them in .env)",
            platform=platform.name,
        )
    return {"Modal-Key": token_id, "Modal-Secret": token_secret}


def app_file_for(platform: Platform) -> Path:
    """The platform's `modal_app` (relative to the current directory), else the bundled one."""
    if platform.modal_app:
        path = Path(platform.modal_app).expanduser()
        return path if path.is_absolute() else Path.cwd() / path
    return bundled_app_file()


def deploy_env_for(platform: Platform) -> dict[str, str]:
    """The settings passed to the app file: `deploy_env`, with `APP_NAME` = the platform's app."""
    env = dict(platform.deploy_env)
    if platform.app:
        env["APP_NAME"] = platform.app
    return env


class ModalProvider:
    """Start (locate, deploy or run ephemerally), pin and stop one `modal` platform."""

    def __init__(
        self,
        platform: Platform,
        *,
        deploy: bool = False,
        ephemeral: bool = False,
        sdk: ModalBackend | None = None,
    ) -> None:
        """`sdk` defaults to `load_sdk()` (the real adapter, or the test seam's), made lazily."""
        self.platform = platform
        self.deploy_first = deploy
        self.ephemeral = ephemeral
        self._sdk = sdk
        self._stack = contextlib.ExitStack()
        self._ephemeral_open = False
        # The min_containers to restore at unpin; None while not pinned.
        self._restore_min: int | None = None

    # -- helpers

    @property
    def sdk(self) -> ModalBackend:
        """The Modal adapter (loaded on first use, so constructing a provider is free)."""
        if self._sdk is None:
            self._sdk = load_sdk()
        return self._sdk

    @property
    def app(self) -> str:
        """The Modal app name (required for the `modal` kind)."""
        if not self.platform.app:
            raise ConfigError(
                "kind 'modal' needs field 'app'", "add app = ... to the table", platform=self.name
            )
        return self.platform.app

    @property
    def name(self) -> str:
        """The platform name."""
        return self.platform.name

    @property
    def function(self) -> str | None:
        """The web function to target: `function`, else `serve` unless a server is set."""
        if self.platform.server:
            return None
        return self.platform.function or DEFAULT_FUNCTION

    @contextlib.contextmanager
    def _attributed(self) -> Iterator[None]:
        """Re-raise the adapter's errors with this platform's name in them."""
        try:
            yield
        except NotDeployedError as error:
            # The adapter does not know the platform's name; the fix should.
            raise NotDeployedError(
                error.problem, deploy_fix(self.name), platform=self.name
            ) from error
        except PlatformError as error:
            attributed = error.for_platform(self.name)
            if attributed is error:
                raise
            raise attributed from error

    # -- Provider

    def start(self) -> Target:
        """Deploy or run the app if asked, locate it, and return where it answers."""
        if self.deploy_first and self.ephemeral:
            raise ConfigError(
                "--vllm-deploy and --vllm-ephemeral were both given",
                "pick one: deploy the app for good, or run it for this session only",
                platform=self.name,
            )
        platform = self.platform
        # Checked before anything is deployed: a missing proxy token must not cost a deploy.
        headers = self.proxy_headers()
        app = self.app
        with self._attributed():
            if self.ephemeral:
                url = self._stack.enter_context(
                    self.sdk.ephemeral(
                        app_file_for(platform),
                        deploy_env_for(platform),
                        self.function,
                        platform.server,
                        platform.environment,
                    )
                )
                self._ephemeral_open = True
            else:
                if self.deploy_first:
                    self.sdk.deploy(
                        app_file_for(platform),
                        deploy_env_for(platform),
                        app,
                        platform.environment,
                    )
                url = self.sdk.locate(app, self.function, platform.server, platform.environment)
        return Target(
            base_url=url.rstrip("/") + "/v1",
            api_key=api_key_for(platform),
            headers=headers,
        )

    def failure(self) -> str | None:
        """Always None: a Modal endpoint that scaled to zero can come back."""
        return None

    def stop(self) -> None:
        """Stop the ephemeral app if one runs; safe to call twice and after a failed start."""
        self._ephemeral_open = False
        with self._attributed():
            self._stack.close()

    # -- what the `modal-vllm` command needs

    def proxy_headers(self) -> dict[str, str]:
        """The Modal proxy auth headers of this platform ({} without `proxy_auth`)."""
        return proxy_headers(self.platform)

    def deploy(self) -> str | None:
        """Deploy the platform's app (Modal's output shown); returns its URL (without `/v1`)."""
        platform = self.platform
        with self._attributed():
            self.sdk.deploy(
                app_file_for(platform), deploy_env_for(platform), self.app, platform.environment
            )
            return self.sdk.locate(self.app, self.function, platform.server, platform.environment)

    def status(self) -> ModalStatus:
        """Deployed or not, and the URL (without `/v1`); looks up only, wakes nothing."""
        with self._attributed():
            return self.sdk.status(
                self.app, self.function, self.platform.server, self.platform.environment
            )

    def stop_app(self) -> bool:
        """Stop the deployed app: True if stopped, False if it was not deployed."""
        with self._attributed():
            return self.sdk.stop_app(self.app, self.platform.environment)

    # -- autoscaler keep-alive

    def pin(self) -> None:
        """Keep one container up: read `min_containers`, then set it to 1 (if it is below 1).

        A value that cannot be read (an API error other than a configuration error) counts
        as 0, so that unpin sets 0 back.
        """
        if self._restore_min is not None:
            return
        platform = self.platform
        with self._attributed():
            try:
                previous = self.sdk.get_min_containers(
                    self.app, self.function, platform.server, platform.environment
                )
            except UnavailableError:
                previous = 0
            if previous < 1:
                self.sdk.update_autoscaler(
                    self.app, self.function, platform.server, platform.environment, 1
                )
        self._restore_min = previous

    def unpin(self) -> None:
        """Set `min_containers` back to the value read by `pin`; a no-op if not pinned.

        Idempotent: the pin is forgotten before the call, so a failed restore is not retried
        by a second unpin (the error is raised once, for the session to report).
        """
        previous, self._restore_min = self._restore_min, None
        if previous is None or previous >= 1:
            return  # never pinned, or pin changed nothing
        if self.ephemeral and not self._ephemeral_open:
            return  # the ephemeral app is gone, and its settings with it
        platform = self.platform
        with self._attributed():
            self.sdk.update_autoscaler(
                self.app, self.function, platform.server, platform.environment, previous
            )

    @property
    def pinned(self) -> bool:
        """Whether `pin` ran and `unpin` has not yet."""
        return self._restore_min is not None
