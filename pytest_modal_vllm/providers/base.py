"""The one small interface every platform kind implements.

A provider turns a validated `Platform` into a reachable `Target` (deploying, starting or
locating what is needed), can say whether what it started has died, and stops it again.
`session.py` drives providers; nothing else calls them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..platforms import Platform


@dataclass(frozen=True)
class Target:
    """Where a started platform answers: base URL (ending in `/v1`), key and extra headers."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


class Provider(Protocol):
    """Start, watch and stop the endpoint of one platform."""

    platform: Platform

    def start(self) -> Target:
        """Deploy, start or locate the endpoint; raise `ConfigError`/`UnavailableError`."""
        ...

    def failure(self) -> str | None:
        """Why the endpoint can no longer come up (a dead process), or `None` while it can."""
        ...

    def stop(self) -> None:
        """Stop whatever `start` started; safe to call twice and after a failed start."""
        ...


def api_key_for(platform: Platform) -> str | None:
    """The API key from the platform's `api_key_env` variable; `None` (send none) when unset."""
    return os.environ.get(platform.api_key_env) or None
