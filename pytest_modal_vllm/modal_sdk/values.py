"""The values the Modal adapter speaks in: targets, settings, status, and the exit-4 errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ConfigError

ADAPTER_ENV = "MODAL_VLLM_SDK_ADAPTER"
DEFAULT_FUNCTION = "serve"
# The app tag that records the settings a deployed app was deployed with (`fingerprint()`).
FINGERPRINT_TAG = "modal-vllm-fingerprint"
# The settings handed to an app file as one JSON object: an app that reads them (the bundled
# one does) sees only the platform's settings, never unrelated variables of the shell.
SETTINGS_ENV = "MODAL_VLLM_SETTINGS"

AUTH_FIX = (
    "authenticate with Modal: run `modal setup` (or `modal token new`), or set "
    "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
)


class NotDeployedError(ConfigError):
    """The Modal app, or the function/server in it, is not deployed (exit 4)."""


@dataclass(frozen=True)
class ModalTarget:
    """The web function or server of a Modal app that a platform points at."""

    app: str
    # Exactly one of `function` and `server` is set (the function defaults to `serve`).
    function: str | None = DEFAULT_FUNCTION
    server: str | None = None
    environment: str | None = None

    @property
    def name(self) -> str:
        """The name looked up in the app: the server if set, else the function."""
        return self.server or self.function or DEFAULT_FUNCTION

    def describe(self) -> str:
        """`web function 'serve' of Modal app 'x'` (with the environment when set)."""
        kind = "server" if self.server else "web function"
        env = f" in Modal environment {self.environment!r}" if self.environment else ""
        return f"{kind} {self.name!r} of Modal app {self.app!r}{env}"


@dataclass(frozen=True)
class Autoscaler:
    """The autoscaler settings the plugin changes and restores."""

    min_containers: int
    # Seconds an idle container stays up; None when Modal reports none set.
    scaledown_window: int | None


class LeaseStore(Protocol):
    """A named, persistent key-value store shared by every session of an app (a `modal.Dict`
    on Modal): `put(..., skip_if_exists=True)` is an atomic create."""

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Store `value`; with `skip_if_exists`, only if `key` is absent. True if stored."""
        ...

    def get(self, key: str) -> Any:
        """The value of `key`, or None."""
        ...

    def pop(self, key: str) -> Any:
        """Remove `key`; its value, or None."""
        ...

    def items(self) -> list[tuple[str, Any]]:
        """Every key and value."""
        ...


def lease_dict_name(target: ModalTarget) -> str:
    """`modal-vllm-leases-<app>`: the Dict of an app's leases (names stay under 64 characters:
    a long app name is cut and followed by a short hash of it)."""
    name = f"modal-vllm-leases-{target.app}"
    if len(name) > 63:
        name = f"{name[:54]}-{hashlib.sha256(target.app.encode()).hexdigest()[:8]}"
    return name


@dataclass(frozen=True)
class ModalStatus:
    """What `status()` found from Modal's control plane, without waking any container.

    `None` means "not known" (not deployed, or not offered for this kind of target).
    """

    deployed: bool
    url: str | None = None
    detail: str = ""
    # Containers running (booting or serving) and requests waiting for one.
    containers: int | None = None
    backlog: int | None = None
    # Whether the endpoint demands Modal proxy auth (False: anyone with the URL wakes it).
    proxy_auth: bool | None = None
    # The settings fingerprint the plugin tagged the deployed app with (see `deploy`).
    fingerprint: str | None = None


def deploy_fix(platform: str | None = None) -> str:
    """How to deploy: with the platform's name when known."""
    name = platform or "NAME"
    return (
        f"deploy it with `modal-vllm deploy {name}`, or run pytest with --vllm-deploy "
        "(or --vllm-ephemeral for an app that lives only as long as the session)"
    )


def not_deployed_error(
    target: ModalTarget, detail: str = "", *, platform: str | None = None
) -> NotDeployedError:
    """The error for a Modal app/function that cannot be found (the real and fake adapters)."""
    problem = f"the {target.describe()} is not deployed"
    if detail:
        problem += f" (Modal: {detail.strip().rstrip('.')})"
    return NotDeployedError(problem, deploy_fix(platform), platform=platform)


def auth_error(detail: str = "") -> ConfigError:
    """The error for missing or rejected Modal credentials."""
    problem = "no valid Modal credentials"
    # Modal's own message goes on to suggest `modal token new`: its first sentence is enough.
    first = detail.strip().split(". ", 1)[0].rstrip(".")
    if first:
        problem += f" (Modal: {first})"
    return ConfigError(problem, AUTH_FIX)
