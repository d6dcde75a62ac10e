"""The `modal` kind: a vLLM endpoint served by a Modal web function or server.

`start()` locates the deployed endpoint through the Modal SDK; in `deploy` mode it deploys
the platform's app file first, in `ephemeral` mode it runs the app as an ephemeral Modal app
that lives until `stop()`. URLs always come from the SDK, never built by hand. The app file,
its settings (`deploy_env`, with `APP_NAME` = the platform's app) and the target come from
the resolution.

`pin()`/`unpin()` implement the `autoscaler` keep-alive: `min_containers=1` while the session
runs, then the value read before pinning (0 when it could not be read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import PlatformError, UnavailableError
from ..modal_sdk import ModalBackend, ModalTarget, NotDeployedError, deploy_fix, load_sdk
from ..probe import root_of
from ..resolution import ResolvedPlatform
from . import health_line


class ModalProvider:
    """Start (locate, deploy or run ephemerally), pin and stop one `modal` platform."""

    OPTIONS = ("sdk",)

    def __init__(self, platform: ResolvedPlatform, *, sdk: ModalBackend | None = None) -> None:
        """`sdk` defaults to `load_sdk()` (the real adapter, or the test seam's), made lazily."""
        assert platform.modal is not None
        self.platform = platform
        self.target: ModalTarget = platform.modal
        self._sdk = sdk
        self._stack = contextlib.ExitStack()
        self._ephemeral_open = False
        # The min_containers to restore at unpin; None while not pinned.
        self._restore_min: int | None = None

    @property
    def sdk(self) -> ModalBackend:
        """The Modal adapter (loaded on first use, so constructing a provider is free)."""
        if self._sdk is None:
            self._sdk = load_sdk()
        return self._sdk

    @contextlib.contextmanager
    def _attributed(self) -> Iterator[None]:
        """Re-raise the adapter's errors with this platform's name in them."""
        name = self.platform.name
        try:
            yield
        except NotDeployedError as error:
            # The adapter does not know the platform's name; the fix should.
            raise NotDeployedError(error.problem, deploy_fix(name), platform=name) from error
        except PlatformError as error:
            attributed = error.for_platform(name)
            if attributed is error:
                raise
            raise attributed from error

    # -- Provider

    def start(self) -> str:
        """Deploy or run the app if asked, locate it, and return its base URL."""
        platform = self.platform
        assert platform.modal_app is not None
        with self._attributed():
            if platform.modal_mode == "ephemeral":
                url = self._stack.enter_context(
                    self.sdk.ephemeral(platform.modal_app, platform.deploy_env, self.target)
                )
                self._ephemeral_open = True
            else:
                if platform.modal_mode == "deploy":
                    self.sdk.deploy(platform.modal_app, platform.deploy_env, self.target)
                url = self.sdk.locate(self.target)
        return url.rstrip("/") + "/v1"

    def failure(self) -> str | None:
        """Always None: a Modal endpoint that scaled to zero can come back."""
        return None

    def status(self) -> list[str]:
        """Deployed or not, and the URL; wakes nothing."""
        with self._attributed():
            found = self.sdk.status(self.target)
        if not found.deployed:
            return ["deployed: no", f"deploy it with: modal-vllm deploy {self.platform.name}"]
        assert found.url is not None
        return [
            "deployed: yes",
            f"url: {found.url}/v1",
            health_line(root_of(found.url), dict(self.platform.headers)),
        ]

    def stop(self) -> None:
        """Stop the ephemeral app if one runs; safe to call twice and after a failed start."""
        self._ephemeral_open = False
        with self._attributed():
            self._stack.close()

    # -- what the `modal-vllm` command needs

    def deploy(self) -> str | None:
        """Deploy the platform's app (Modal's output shown); returns its URL (without `/v1`)."""
        assert self.platform.modal_app is not None
        with self._attributed():
            self.sdk.deploy(self.platform.modal_app, self.platform.deploy_env, self.target)
            return self.sdk.locate(self.target)

    def stop_app(self) -> bool:
        """Stop the deployed app: True if stopped, False if it was not deployed."""
        with self._attributed():
            return self.sdk.stop_app(self.target)

    # -- autoscaler keep-alive

    def pin(self) -> None:
        """Keep one container up: read `min_containers`, then set it to 1 (if it is below 1).

        A value that cannot be read (an API error other than a configuration error) counts
        as 0, so that unpin sets 0 back.
        """
        if self._restore_min is not None:
            return
        with self._attributed():
            try:
                previous = self.sdk.get_min_containers(self.target)
            except UnavailableError:
                previous = 0
            if previous < 1:
                self.sdk.update_autoscaler(self.target, 1)
        self._restore_min = previous

    def unpin(self) -> None:
        """Set `min_containers` back to the value read by `pin`; a no-op if not pinned.

        Idempotent: the pin is forgotten before the call, so a failed restore is not retried
        by a second unpin (the error is raised once, for the session to report).
        """
        previous, self._restore_min = self._restore_min, None
        if previous is None or previous >= 1:
            return  # never pinned, or pin changed nothing
        if self.platform.modal_mode == "ephemeral" and not self._ephemeral_open:
            return  # the ephemeral app is gone, and its settings with it
        with self._attributed():
            self.sdk.update_autoscaler(self.target, previous)

    @property
    def pinned(self) -> bool:
        """Whether `pin` ran and `unpin` has not yet."""
        return self._restore_min is not None
