"""The `modal` kind: a vLLM endpoint served by a Modal web function or server.

`start()` locates the deployed endpoint through the Modal SDK; in `deploy` mode it deploys
the platform's app file first, in `ephemeral` mode it runs the app as an ephemeral Modal app
that lives until `stop()`. URLs always come from the SDK, never built by hand. The app file,
its settings (`deploy_env`, with `APP_NAME` = the platform's app) and the target come from
the resolution.

`--vllm-deploy` deploys only when needed: the deployed app carries a fingerprint of the app
file and its settings (an app tag); when it matches, the deploy is skipped (a redeploy would
drain the warm containers and wipe autoscaler overrides). `pin()`/`unpin()` implement the
`autoscaler` keep-alive: `min_containers=1` while the session runs, then the value read before
pinning; when it cannot be read, nothing is pinned (`SettingUnreadable`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import PlatformError, SettingUnreadable, UnavailableError
from ..leases import LeaseBook, who
from ..modal_sdk import (
    ModalBackend,
    ModalStatus,
    ModalTarget,
    NotDeployedError,
    deploy_fix,
    fingerprint,
    lease_dict_name,
    load_sdk,
)
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
        # For the wake's first progress line: whether a container already runs.
        self.wake_note: str | None = None
        # What `start()` did about the deploy ("deployed", or why not), for the user.
        self.notes: list[str] = []

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
                self.wake_note = "ephemeral app: a cold start is expected"
                return url.rstrip("/") + "/v1"
            found = self.sdk.status(self.target)
            if platform.modal_mode == "deploy":
                found = self.deploy(current=found)
            if not found.deployed or found.url is None:
                raise NotDeployedError(found.detail, deploy_fix(platform.name))
        self.wake_note = _containers_note(found)
        return found.url.rstrip("/") + "/v1"

    def failure(self) -> str | None:
        """Always None: a Modal endpoint that scaled to zero can come back."""
        return None

    def status(self) -> list[str]:
        """Deployed or not, URL, containers, proxy auth, settings; wakes nothing.

        `/health` is asked only when a container is already up: for a web endpoint any
        request is demand, and asking a scaled-to-zero app would start (and bill) one.
        """
        with self._attributed():
            found = self.sdk.status(self.target)
        if not found.deployed:
            return ["deployed: no", f"deploy it with: modal-vllm deploy {self.platform.name}"]
        assert found.url is not None
        lines = ["deployed: yes", f"url: {found.url}/v1"]
        if found.containers is not None:
            queued = "" if found.backlog is None else f", {found.backlog} queued"
            lines.append(f"containers: {found.containers} running{queued}")
        if found.containers:
            lines.append(health_line(root_of(found.url), dict(self.platform.headers)))
        else:
            lines.append("answers /health now: not asked (no container is up; asking starts one)")
        assert self.platform.modal_app is not None
        wanted = fingerprint(self.platform.modal_app, self.platform.deploy_env)
        if found.fingerprint is not None:
            same = "the platform's settings" if found.fingerprint == wanted else "other settings"
            lines.append(f"deployed with: {same} (fingerprint {found.fingerprint[:12]})")
        if found.proxy_auth is False:
            lines.append(
                "WARNING: proxy auth is off: anyone who knows the URL can start (and bill) a "
                "container; set proxy_auth = true on the platform and redeploy"
            )
        return lines + self._lease_lines()

    def _lease_lines(self) -> list[str]:
        """Who keeps the app warm (clearing expired leases on the way, as every session does)."""
        book = self.lease_book("ping")
        try:
            cleared = book.release()
            live, record, pinger = book.live(), book.original(), book.pinger()
        except PlatformError as error:
            return [f"leases: cannot be read ({error.problem})"]
        now = book.clock()
        lines = [f"leases ({lease_dict_name(self.target)}, TTL {book.ttl:g}s): {len(live)} live"]
        lines += [f"  {lease.describe(now)}" for lease in live]
        if record is not None:
            parked = " (parked until the next session)" if record.get("parked") else ""
            lines.append(
                f"original settings: min_containers={record['min_containers']}, "
                f"scaledown_window={record['scaledown_window']}{parked}, recorded by "
                f"{record.get('by')}"
            )
        if pinger is not None:
            lines.append(f"pinged by: {pinger}")
        return lines + cleared

    def release(self, *, everything: bool = False) -> list[str]:
        """Clear expired leases (`everything`: all of them); with none left, restore the app's
        settings. What was done, as lines."""
        with self._attributed():
            return self.lease_book("ping").release(everything=everything)

    def stop(self) -> None:
        """Stop the ephemeral app if one runs; safe to call twice and after a failed start."""
        self._ephemeral_open = False
        with self._attributed():
            self._stack.close()

    # -- what the `modal-vllm` command needs

    def deploy(self, *, force: bool = False, current: ModalStatus | None = None) -> ModalStatus:
        """Deploy the platform's app unless it is deployed with the same settings already
        (`force` deploys anyway); the app's status afterwards. `notes` say which."""
        platform = self.platform
        assert platform.modal_app is not None
        wanted = fingerprint(platform.modal_app, platform.deploy_env)
        with self._attributed():
            found = current or self.sdk.status(self.target)
            if found.deployed and found.fingerprint == wanted and not force:
                self.notes.append(
                    f"app {self.target.app!r} is already deployed with these settings: not "
                    f"redeployed (`modal-vllm deploy {platform.name} --force` redeploys)"
                )
                return found
            self.sdk.deploy(platform.modal_app, platform.deploy_env, self.target, wanted)
            self.notes.append(f"deployed app {self.target.app!r}")
            return self.sdk.status(self.target)

    def stop_app(self) -> bool:
        """Stop the deployed app: True if stopped, False if it was not deployed."""
        with self._attributed():
            return self.sdk.stop_app(self.target)

    # -- autoscaler keep-alive

    def pin(self) -> None:
        """Keep one container up: read `min_containers`, then set it to 1 (if it is below 1).

        A value that cannot be read is never guessed (a guess of 0 would later "restore" 0
        over a real 2): nothing is written and `SettingUnreadable` says why.
        """
        if self._restore_min is not None:
            return
        with self._attributed():
            try:
                previous = self.sdk.autoscaler(self.target).min_containers
            except UnavailableError as error:
                raise SettingUnreadable(
                    f"its autoscaler's min_containers could not be read ({error.problem})",
                    "nothing was pinned",
                ) from error
            if previous < 1:
                self.sdk.update_autoscaler(self.target, min_containers=1)
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
            self.sdk.update_autoscaler(self.target, min_containers=previous)

    def lease_book(self, mode: str) -> LeaseBook:
        """This session's lease on the app (`leases.py`), for `ping` or `autoscaler` mode."""
        platform = self.platform
        return LeaseBook(
            self.sdk.leases(self.target),
            self.sdk,
            self.target,
            mode=mode,
            interval=platform.keep_alive_interval,
            fast_scaledown=platform.definition.fast_scaledown,
            holder=who(platform.name),
        )

    @property
    def pinned(self) -> bool:
        """Whether `pin` ran and `unpin` has not yet."""
        return self._restore_min is not None


def _containers_note(found: ModalStatus) -> str | None:
    """The wake's first progress line: is a container up (warm) or is a cold start coming?"""
    if found.containers is None:
        return None
    if found.containers == 0:
        return "no container running: a cold start is expected"
    return f"{found.containers} container{'s' if found.containers > 1 else ''} running"
